"""Records -> manifest: one row per image with its split, statistics and content hash.

Columns: path, category, split (train | val | test), label, defect_type, mask_path, width, height,
channels, sha256, readable, error, mask_width, mask_height, mask_values (distinct values in the
mask file). The inspection columns let the validation gate check things a table check alone
cannot (decoding, mask geometry); nothing here decides whether the data is good.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..files import atomic_write

from .images import _decode
from .layouts import Record, read_layout

COLUMNS = [
    "path", "category", "split", "label", "defect_type", "mask_path", "width", "height", "channels", "sha256",
    "readable", "error", "mask_width", "mask_height", "mask_values",
]


def is_val(path: str, val_fraction: float) -> bool:
    """Hold a normal training image out for validation by a hash of its file name.

    The decision depends on the name alone, so adding or removing other images never moves an
    existing image between train and val.
    """
    digest = hashlib.sha256(Path(path).name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _inspect(record: Record) -> dict:
    row: dict = {"width": 0, "height": 0, "channels": 0, "sha256": "", "readable": False, "error": "",
                 "mask_width": 0, "mask_height": 0, "mask_values": ""}
    path = Path(record.path)
    try:
        row["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        image = _decode(path)
        row.update(height=image.shape[0], width=image.shape[1], channels=1 if image.ndim == 2 else image.shape[2], readable=True)
    except OSError as exc:
        row["error"] = str(exc)
    if record.mask_path:
        try:
            mask = _decode(record.mask_path)
            row.update(mask_height=mask.shape[0], mask_width=mask.shape[1])
            row["mask_values"] = " ".join(str(v) for v in np.unique(mask)[:8])
        except OSError as exc:
            row["error"] = (row["error"] + " | " if row["error"] else "") + f"mask {exc}"
    return row


def build_manifest(name: str, root: str | Path, category: str, val_fraction: float, progress: bool = True,
                   exclude: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Read one category's layout and inspect every file -> manifest DataFrame (columns: COLUMNS).

    ``exclude``: glob patterns, relative to the dataset root (``dataset.exclude``), of images left
    out, e.g. known mislabelled ones; a pattern that matches no image of the layout is an error, so
    a typo cannot silently keep an image in."""
    records = read_layout(name, root, category)
    if exclude:
        records = _without(records, Path(root), category, list(exclude))
    rows = []
    for record in tqdm(records, desc=f"manifest {category}", unit="img", disable=not progress):
        split = record.split
        if split == "train" and is_val(record.path, val_fraction):
            split = "val"
        rows.append({**record.__dict__, "split": split, **_inspect(record)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _without(records: list[Record], root: Path, category: str, patterns: list[str]) -> list[Record]:
    from fnmatch import fnmatchcase

    base = root.resolve()
    resolved = [Path(r.path).resolve() for r in records]
    relative = [p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix() for p in resolved]
    mine = [p for p in patterns if p.split("/", 1)[0] in (category, "*")]
    unused = [p for p in mine if p.split("/", 1)[0] == category and not any(fnmatchcase(rel, p) for rel in relative)]
    if unused:
        raise ValueError(f"dataset.exclude: {', '.join(unused)} matches no image of {category} under {root}. Patterns are relative "
                         f"to dataset.root, e.g. '{relative[0] if relative else category + '/test/ko/0001.bmp'}'; fix or remove them.")
    return [r for r, rel in zip(records, relative) if not any(fnmatchcase(rel, p) for p in mine)]


def read_manifest(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path, keep_default_na=False, dtype={"mask_path": str, "mask_values": str, "error": str, "sha256": str})
    return frame


def write_manifest(frame: pd.DataFrame, path: str | Path) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def ingest_category(params, category: str, progress: bool = True) -> pd.DataFrame:
    """The manifest of one category from params (``urd.config.Params``); the demo dataset is
    generated first when ``dataset.name`` is ``demo`` and its folder does not exist yet. A demo
    written by an older version of the generator is an error, not silently used: its images and
    splits differ from the ones the documented numbers were measured on."""
    p = params.for_category(category)
    root = Path(p.dataset.root)
    if p.dataset.name == "demo":
        from .demo import DemoSpec, generate_demo, require_current_version

        if not root.exists():
            generate_demo(root, DemoSpec(seed=p.seed))
        require_current_version(root)
    return build_manifest(p.dataset.name, root, category, p.dataset.val_fraction, progress, p.dataset.exclude)
