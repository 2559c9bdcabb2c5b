"""The embedded demo dataset: two synthetic product categories in the MVTec AD layout.

* ``tiles`` (texture): a floor of glazed tiles with grout lines. Good images vary in lighting,
  grid phase (shift), tile shade and sensor noise. Defects: ``crack`` (thin dark jagged line),
  ``stain`` (low-contrast blotch), ``chip`` (a broken tile corner showing the grout bed).
* ``widget`` (object): a machined disc with a bore and four bolt holes on a dark conveyor. Good
  images vary in position, rotation, lighting and noise. Defects: ``scratch`` (thin bright or dark
  line on the face), ``missing_piece`` (a bite out of the rim), ``contamination`` (dark specks).

Every defect is drawn with its exact pixel mask; some are small or low-contrast on purpose.
Generation is deterministic from the seed (one RNG stream per image) and takes a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

DEMO_VERSION = 4  # 4: test split 48 good + 24 per defect type (was 16 + 8)
CATEGORIES = {"tiles": ("crack", "stain", "chip"), "widget": ("scratch", "missing_piece", "contamination")}


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 0
    size: int = 256
    train: int = 120
    test_good: int = 48
    test_per_defect: int = 24
    version: int = DEMO_VERSION


# --------------------------------------------------------------------------------------------- helpers


def _smooth_noise(rng: np.random.Generator, size: int, scales=(4, 16, 48), weights=(0.5, 0.3, 0.2)) -> np.ndarray:
    """Fractal-ish noise in [-1, 1]: blurred white noise at a few scales."""
    out = np.zeros((size, size), np.float32)
    for s, w in zip(scales, weights):
        n = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), s / 2)
        out += w * n / (n.std() + 1e-6)
    return np.clip(out / 2.5, -1, 1)


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Lighting (global gain and offset) and sensor noise -> uint8."""
    gain = rng.uniform(0.94, 1.06)
    offset = rng.uniform(-4, 4)
    img = img * gain + offset
    img = img + rng.normal(0, rng.uniform(1.0, 2.5), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jagged_polyline(rng: np.random.Generator, start: np.ndarray, length: float, step: float = 6.0) -> np.ndarray:
    points = [start.astype(np.float32)]
    direction = rng.uniform(0, 2 * np.pi)
    for _ in range(max(2, int(length / step))):
        direction += rng.normal(0, 0.45)
        points.append(points[-1] + step * np.array([np.cos(direction), np.sin(direction)], np.float32))
    return np.round(np.array(points)).astype(np.int32)


def _blob(rng: np.random.Generator, size: int, center: np.ndarray, radius: float) -> np.ndarray:
    """A filled irregular blob mask (uint8 0/1)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, 11))
    radii = radius * rng.uniform(0.6, 1.3, angles.size)
    pts = np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], 1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


# ----------------------------------------------------------------------------------------------- tiles


def _tiles(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A good tile image (float32 HxWx3, 0-255) and its grout mask (bool)."""
    pitch = 32
    phase_y, phase_x = rng.integers(0, pitch, 2)
    base = np.array([196, 184, 160], np.float32) + rng.normal(0, 3, 3)
    yy, xx = np.mgrid[0:size, 0:size]
    ty, tx = (yy + phase_y) // pitch, (xx + phase_x) // pitch
    shades = rng.normal(0, 5, (size // pitch + 2, size // pitch + 2)).astype(np.float32)
    img = base + shades[ty, tx][..., None]
    img = img + 10 * _smooth_noise(rng, size, scales=(2, 6), weights=(0.6, 0.4))[..., None]
    grout = ((yy + phase_y) % pitch < 3) | ((xx + phase_x) % pitch < 3)
    img[grout] = np.array([120, 118, 112], np.float32) + rng.normal(0, 2, 3)
    return img, grout


def _tiles_defect(rng: np.random.Generator, img: np.ndarray, grout: np.ndarray, kind: str) -> np.ndarray:
    size = img.shape[0]
    k = size / 256  # defect geometry is specified for 256 x 256 images
    mask = np.zeros((size, size), np.uint8)
    if kind == "crack":
        line = _jagged_polyline(rng, rng.uniform(40 * k, size - 40 * k, 2), rng.uniform(50, 130) * k, step=6.0 * k)
        cv2.polylines(mask, [line], False, 1, thickness=max(1, int(rng.integers(2, 4) * k)))
        img[mask > 0] *= rng.uniform(0.45, 0.7)
    elif kind == "stain":
        mask = _blob(rng, size, rng.uniform(40 * k, size - 40 * k, 2), rng.uniform(10, 26) * k)
        tint = rng.choice([-1, 1]) * rng.uniform(16, 32) * np.array([1.0, 0.8, 0.5], np.float32)
        img[mask > 0] += tint
    elif kind == "chip":
        # A broken corner of one tile: a triangle against two grout lines, showing the rough bed.
        ys, xs = np.nonzero(grout[3:-3, 3:-3] & np.roll(grout, 1, 0)[3:-3, 3:-3] & np.roll(grout, 1, 1)[3:-3, 3:-3])
        i = rng.integers(len(ys))
        cy, cx = ys[i] + 3, xs[i] + 3
        leg = rng.uniform(12, 24) * k
        sy, sx = rng.choice([-1, 1], 2)
        tri = np.array([[cx, cy], [cx + sx * leg, cy], [cx, cy + sy * leg]], np.float32)
        cv2.fillPoly(mask, [np.round(tri).astype(np.int32)], 1)
        mask[grout] = 0
        bed = 95 + 12 * _smooth_noise(rng, size, scales=(1, 3), weights=(0.7, 0.3))
        img[mask > 0] = bed[mask > 0][:, None] * np.array([1.0, 0.95, 0.85], np.float32)
    else:
        raise ValueError(kind)
    return mask


# ---------------------------------------------------------------------------------------------- widget


def _widget(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A good widget image (float32 HxWx3), its part mask (uint8 0/1) and its geometry."""
    c = size / 2 + rng.uniform(-5, 5, 2) * size / 256
    r_outer = size * 0.33
    r_bore = size * 0.1
    rot = rng.uniform(-8, 8) * np.pi / 180
    img = np.full((size, size, 3), 34, np.float32) + 6 * _smooth_noise(rng, size)[..., None]
    part = np.zeros((size, size), np.uint8)
    cv2.circle(part, tuple(np.round(c).astype(int)), int(r_outer), 1, -1, lineType=cv2.LINE_8)
    cv2.circle(part, tuple(np.round(c).astype(int)), int(r_bore), 0, -1, lineType=cv2.LINE_8)
    for k in range(4):
        a = rot + k * np.pi / 2 + np.pi / 4
        hole = c + 0.68 * r_outer * np.array([np.cos(a), np.sin(a)])
        cv2.circle(part, tuple(np.round(hole).astype(int)), int(size * 0.028), 0, -1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rr = np.hypot(yy - c[1], xx - c[0]) / r_outer
    shade = 178 + 40 * (1 - rr) + 6 * np.cos(6 * np.arctan2(yy - c[1], xx - c[0]) + 3 * rot)  # machining marks
    metal = shade[..., None] * np.array([1.0, 1.0, 1.04], np.float32) + 4 * _smooth_noise(rng, size, (1, 4), (0.5, 0.5))[..., None]
    img = np.where(part[..., None] > 0, metal, img)
    return img, part, {"center": c, "r_outer": r_outer, "r_bore": r_bore}


def _widget_defect(rng: np.random.Generator, img: np.ndarray, part: np.ndarray, geo: dict, background: np.ndarray, kind: str) -> np.ndarray:
    size = img.shape[0]
    k = size / 256  # defect geometry is specified for 256 x 256 images
    c, r_outer, r_bore = geo["center"], geo["r_outer"], geo["r_bore"]
    mask = np.zeros((size, size), np.uint8)
    if kind == "scratch":
        a = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(r_bore + 8 * k, r_outer - 12 * k)
        p0 = c + r * np.array([np.cos(a), np.sin(a)])
        d = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(30, 80) * k
        p1 = p0 + length * np.array([np.cos(d), np.sin(d)])
        cv2.line(mask, tuple(np.round(p0).astype(int)), tuple(np.round(p1).astype(int)), 1, max(1, int(rng.integers(2, 5) * k)))
        mask &= part
        img[mask > 0] += rng.choice([-1, 1]) * rng.uniform(25, 50)
    elif kind == "missing_piece":
        a = rng.uniform(0, 2 * np.pi)
        bite = c + r_outer * np.array([np.cos(a), np.sin(a)])
        cv2.circle(mask, tuple(np.round(bite).astype(int)), max(2, int(rng.uniform(10, 24) * k)), 1, -1)
        mask &= part
        img[mask > 0] = background[mask > 0]
    elif kind == "contamination":
        for _ in range(int(rng.integers(1, 4))):
            a = rng.uniform(0, 2 * np.pi)
            r = rng.uniform(r_bore + 6 * k, r_outer - 6 * k)
            mask |= _blob(rng, size, c + r * np.array([np.cos(a), np.sin(a)]), max(1.5, rng.uniform(4, 10) * k))
        mask &= part
        img[mask > 0] = img[mask > 0] * rng.uniform(0.35, 0.75) + rng.normal(0, 4, (int(mask.sum()), 1))
    else:
        raise ValueError(kind)
    return mask


# ------------------------------------------------------------------------------------------- generator


def render(category: str, rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (uint8 HxWx3 RGB) and, for a defect, its mask (uint8 0/255)."""
    mask = None
    if category == "tiles":
        img, grout = _tiles(rng, size)
        if defect:
            mask = _tiles_defect(rng, img, grout, defect)
    elif category == "widget":
        img, part, geo = _widget(rng, size)
        if defect:
            background = np.full_like(img, 34) + 6 * _smooth_noise(rng, size)[..., None]
            mask = _widget_defect(rng, img, part, geo, background, defect)
    else:
        raise ValueError(f"Unknown demo category {category!r}; the demo has {', '.join(CATEGORIES)}.")
    if mask is not None and mask.sum() == 0:  # a defect clipped away entirely: draw a fresh one
        return render(category, rng, size, defect)
    return _finish(rng, img), None if mask is None else (mask > 0).astype(np.uint8) * 255


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), data):
        raise OSError(f"could not write {path}")


def _generate_into(root: Path, spec: DemoSpec) -> None:
    for ci, (category, defects) in enumerate(CATEGORIES.items()):
        plan = [("train", "good", spec.train), ("test", "good", spec.test_good)]
        plan += [("test", d, spec.test_per_defect) for d in defects]
        for si, (split, kind, count) in enumerate(plan):
            for i in range(count):
                rng = np.random.default_rng([spec.seed, ci, si, i])
                image, mask = render(category, rng, spec.size, None if kind == "good" else kind)
                _write_png(root / category / split / kind / f"{i:03d}.png", image)
                if mask is not None:
                    _write_png(root / category / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    (root / "demo.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")


def recorded_spec(root: str | Path) -> dict | None:
    """The spec a demo folder was written with (its ``demo.json``), or None when it has none."""
    marker = Path(root) / "demo.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def require_current_version(root: str | Path) -> None:
    """Refuse a demo written by another generator version: its images and splits differ from the
    ones the documented numbers were measured on. A folder without ``demo.json`` is not checked."""
    found = (recorded_spec(root) or {}).get("version")
    if found is not None and found != DEMO_VERSION:
        raise ValueError(
            f"{root} holds demo dataset version {found}, but this urd generates version {DEMO_VERSION} (other images "
            f"or splits). Regenerate it with `urd demo-data --root {root} --overwrite`, or point dataset.root elsewhere."
        )


def generate_demo(root: str | Path, spec: DemoSpec = DemoSpec(), overwrite: bool = False) -> Path:
    """Write the demo dataset to ``root`` (MVTec AD layout) and return it.

    An existing demo written with the same spec is left as it is. Anything else already at ``root``
    is only replaced with ``overwrite=True``. The data is written to a temporary folder first and
    moved into place, so an interrupted run leaves no partial dataset.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        found = recorded_spec(root)
        if found == asdict(spec):
            return root
        if not overwrite:
            what = f"a demo written with other settings ({found}; this one is {asdict(spec)})" if found else "data that is not this demo dataset"
            raise FileExistsError(
                f"{root} already holds {what}. Pass overwrite=True (`urd demo-data --overwrite`) to replace it, "
                "or choose another folder."
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        _generate_into(tmp, spec)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root
