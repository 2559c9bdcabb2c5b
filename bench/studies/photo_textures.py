"""Development data from real photographs: crops of photos that installed packages ship, with defects
made here, in the MVTec AD layout.

The demo generator alone is not enough to choose settings (a variant that won on the demo lost on
real photographed textures). These categories are crops of stochastic real-world surfaces shipped
by scikit-image (``brick``, ``grass`` and ``gravel`` stay unseen for a held-out benchmark and are
never used here):

* ``moon``: the lunar surface (512 x 512 grey)
* ``ihc``: immunohistochemistry tissue stain (512 x 512 RGB)
* ``hubble``: the Hubble deep field (872 x 1000 RGB, mostly dark with galaxies)

Each photo is cut into vertical stripes 160 px wide, alternately train and test; a crop lies inside
one stripe, so no pixel of a test image was seen in training, while both splits sample the whole
height of the photo (a top/bottom split made the test normals a different terrain than the train
ones: even a memory bank flagged them). Defects are made by a recipe unlike the demo generator's:

* ``scratch``: a thin bright or dark polyline (1-3 px at 128 px)
* ``patch``: an elliptical piece of the same crop, rotated and mirrored, pasted with a soft edge
  (a texture discontinuity with the right colours)
* ``smudge``: an elliptical region blurred (the texture is missing, the colours are right)
* ``stain``: a smooth elliptical brightness or colour shift

The defects are strong enough that a nearest-patch memory bank on the Lite0 features finds most of
them (bench/results/feature_knn_photos_*.md): a development set on which no feature can see the
defects cannot tell settings apart. Each mask is the defect's region (the line, or the ellipse where its soft edge passes one half); a
defect that changes its region by less than 4 grey levels on average is drawn again on another crop.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

SOURCES = {"moon": "moon", "ihc": "immunohistochemistry", "hubble": "hubble_deep_field"}
DEFECTS = ("scratch", "patch", "smudge", "stain")
CROP = 128
STRIPE = 160


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, SOURCES[name])()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _crop(rng: np.random.Generator, photo: np.ndarray, split: str) -> np.ndarray:
    stripes = [k for k in range(photo.shape[1] // STRIPE) if k % 2 == (0 if split == "train" else 1)]
    x = STRIPE * int(rng.choice(stripes)) + int(rng.integers(0, STRIPE - CROP + 1))
    y = int(rng.integers(0, photo.shape[0] - CROP + 1))
    return photo[y:y + CROP, x:x + CROP].copy()


def _ellipse(rng: np.random.Generator, lo: int, hi: int, feather: float) -> np.ndarray:
    """A soft elliptical alpha (CROP x CROP float in [0, 1]) at a random place, radii in [lo, hi)."""
    alpha = np.zeros((CROP, CROP), np.float32)
    axes = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
    centre = (int(rng.integers(axes[0], CROP - axes[0])), int(rng.integers(axes[1], CROP - axes[1])))
    cv2.ellipse(alpha, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    return cv2.GaussianBlur(alpha, (0, 0), feather) if feather else alpha


def make_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One defect on ``image`` (uint8 RGB) -> (defective image, mask uint8 0/255), or None when it
    would change its region by less than 4 grey levels on average (invisible)."""
    img = image.astype(np.float32)
    if kind == "scratch":
        layer = np.zeros((CROP, CROP), np.float32)
        points = [rng.uniform(16, CROP - 16, 2)]
        for _ in range(int(rng.integers(2, 5))):
            points.append(np.clip(points[-1] + rng.normal(0, 18, 2), 2, CROP - 3))
        cv2.polylines(layer, [np.round(np.array(points)).astype(np.int32)], False, 1.0, int(rng.integers(1, 4)), cv2.LINE_AA)
        target = 255.0 if img.mean() < 128 or rng.random() < 0.5 else 0.0
        strength = rng.uniform(0.6, 0.95)
        alpha = (layer * strength)[..., None]
        out = img * (1 - alpha) + target * alpha
    elif kind == "patch":
        alpha = _ellipse(rng, 9, 22, 1.5)[..., None]
        donor = np.rot90(image, int(rng.integers(1, 4)))[:, ::-1].astype(np.float32)
        donor = np.roll(donor, (int(rng.integers(-40, 40)), int(rng.integers(-40, 40))), axis=(0, 1))
        out = img * (1 - alpha) + donor * alpha
    elif kind == "smudge":
        alpha = _ellipse(rng, 10, 24, 2.0)[..., None]
        out = img * (1 - alpha) + cv2.GaussianBlur(img, (0, 0), rng.uniform(3.5, 6.0)) * alpha
    elif kind == "stain":
        alpha = _ellipse(rng, 8, 22, 4.0)[..., None]
        shift = rng.uniform(45, 80) * rng.choice([-1, 1]) * np.array([1.0, 1.0, 1.0])
        if rng.random() < 0.5:  # a tinted stain rather than a grey one
            shift = shift * rng.uniform(0.2, 1.4, 3)
        out = img + shift * alpha
    else:
        raise ValueError(f"unknown defect {kind!r}; one of {DEFECTS}")
    out = np.clip(out, 0, 255)
    region = (layer > 0.25) if kind == "scratch" else alpha[..., 0] > 0.5
    if np.abs(out - img).max(axis=2)[region].mean() < 4:
        return None
    return np.round(out).astype(np.uint8), region.astype(np.uint8) * 255


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def generate_photo_textures(root: str | Path, seed: int = 1, train: int = 80, test_good: int = 30, per_defect: int = 12) -> Path:
    """Write the photo-texture categories to ``root`` (MVTec AD layout) and return it."""
    root = Path(root)
    for ci, name in enumerate(SOURCES):
        photo = _photo(name)
        for i in range(train):
            _write(root / name / "train" / "good" / f"{i:03d}.png", _crop(np.random.default_rng([seed, ci, 0, i]), photo, "train"))
        for i in range(test_good):
            _write(root / name / "test" / "good" / f"{i:03d}.png", _crop(np.random.default_rng([seed, ci, 1, i]), photo, "test"))
        for di, kind in enumerate(DEFECTS):
            for i in range(per_defect):
                rng = np.random.default_rng([seed, ci, 2 + di, i])
                made = None
                while made is None:
                    made = make_defect(rng, _crop(rng, photo, "test"), kind)
                image, mask = made
                _write(root / name / "test" / kind / f"{i:03d}.png", image)
                _write(root / name / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    (root / "photos.json").write_text(json.dumps({"seed": seed, "train": train, "test_good": test_good, "per_defect": per_defect,
                                                  "sources": SOURCES, "crop": CROP}, indent=2) + "\n")
    return root


if __name__ == "__main__":  # write a copy to look at: python -m bench.studies.photo_textures /tmp/photos
    import sys

    print(generate_photo_textures(sys.argv[1]))
