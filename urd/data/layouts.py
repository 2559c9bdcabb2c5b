"""Dataset layouts on disk -> records (one per image) for one category.

Each reader returns the images of one category with split ``train`` (normal training images) or
``test``, label 0/1, defect type and mask path. The train/val split and the per-file statistics are
added by :mod:`urd.data.manifest`.

Layouts (``dataset.name``):

* ``mvtec``, ``mpdd``, ``demo``: ``<cat>/train/good``, ``<cat>/test/<defect>``,
  ``<cat>/ground_truth/<defect>/<name>_mask.png``
* ``btad``: ``<cat>/train/ok``, ``<cat>/test/ok|ko``, ``<cat>/ground_truth/ko/<name>.png|.bmp``
* ``visa``: ``split_csv/1cls.csv`` (object,split,label,image,mask) over
  ``<cat>/Data/Images/Normal|Anomaly`` and ``<cat>/Data/Masks/Anomaly``; the defect type comes
  from ``<cat>/image_anno.csv`` when present
* ``folder`` (a factory's own data): ``<cat>/train/good`` (normal images to learn from),
  optional ``<cat>/test/good`` and ``<cat>/test/<defect type>``, optional masks
  ``<cat>/masks/<defect type>/<image stem>[_mask].<ext>``
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder that does not have the expected layout; the message names what is missing."""


@dataclass(frozen=True)
class Record:
    path: str
    category: str
    split: str  # train | test (train is split into train/val later)
    label: int  # 0 good, 1 defect
    defect_type: str  # "good" for normal images
    mask_path: str  # "" when there is none


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(
            f"{path} not found: expected {what} of the {layout} layout. Check dataset.root and dataset.name in "
            f"params.yaml (see urd/data/layouts.py for the layouts), or that the category name is spelt as on disk."
        )
    return path


def _find_mask(folder: Path, stem: str, suffixes: tuple[str, ...] = ("_mask", "")) -> str:
    for suffix in suffixes:
        for ext in (".png", ".bmp", ".jpg", ".tif", ".tiff", ".PNG", ".BMP"):
            candidate = folder / f"{stem}{suffix}{ext}"
            if candidate.is_file():
                return str(candidate)
    return ""


def _test_records(test: Path, category: str, mask_dir: Path, mask_suffixes: tuple[str, ...]) -> list[Record]:
    """``test/good`` and ``test/<defect>`` folders -> records; a defect's mask is looked up in
    ``mask_dir/<defect>/<stem><suffix>.<ext>``. A missing mask is recorded as "" and reported by
    the validation gate, not here."""
    records = []
    for defect_dir in sorted(d for d in test.iterdir() if d.is_dir()):
        defect = defect_dir.name
        for p in _images(defect_dir):
            if defect == "good":
                records.append(Record(str(p), category, "test", 0, "good", ""))
            else:
                records.append(Record(str(p), category, "test", 1, defect, _find_mask(mask_dir / defect, p.stem, mask_suffixes)))
    return records


def read_mvtec(root: Path, category: str) -> list[Record]:
    """MVTec AD / MPDD / the demo."""
    base = _require_dir(root / category, f"category folder '{category}'", "MVTec AD")
    records = [Record(str(p), category, "train", 0, "good", "") for p in _images(_require_dir(base / "train" / "good", "train/good", "MVTec AD"))]
    test = _require_dir(base / "test", "test/", "MVTec AD")
    return records + _test_records(test, category, base / "ground_truth", ("_mask",))


def read_btad(root: Path, category: str) -> list[Record]:
    base = _require_dir(root / category, f"category folder '{category}'", "BTAD")
    records = [Record(str(p), category, "train", 0, "good", "") for p in _images(_require_dir(base / "train" / "ok", "train/ok", "BTAD"))]
    test = _require_dir(base / "test", "test/", "BTAD")
    for p in _images(_require_dir(test / "ok", "test/ok", "BTAD")):
        records.append(Record(str(p), category, "test", 0, "good", ""))
    if (test / "ko").is_dir():
        for p in _images(test / "ko"):
            records.append(Record(str(p), category, "test", 1, "ko", _find_mask(base / "ground_truth" / "ko", p.stem, ("", "_mask"))))
    return records


def _visa_defect_types(base: Path) -> dict[str, str]:
    anno = base / "image_anno.csv"
    if not anno.is_file():
        return {}
    with anno.open(newline="") as f:
        return {Path(row["image"]).name: (row.get("label") or "anomaly").strip().replace(" ", "_") for row in csv.DictReader(f)}


def read_visa(root: Path, category: str) -> list[Record]:
    split_csv = root / "split_csv" / "1cls.csv"
    if not split_csv.is_file():
        raise DatasetLayoutError(
            f"{split_csv} not found: the VisA layout needs split_csv/1cls.csv from the original release next to the "
            "category folders. Check dataset.root, or use dataset.name: folder for other layouts."
        )
    base = _require_dir(root / category, f"category folder '{category}'", "VisA")
    defect_types = _visa_defect_types(base)
    records = []
    with split_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["object"] != category:
                continue
            label = 1 if row["label"].strip().lower() == "anomaly" else 0
            image = root / row["image"]
            mask = str(root / row["mask"]) if label and row.get("mask") else ""
            defect = defect_types.get(image.name, "anomaly").replace(",", "_") if label else "good"
            records.append(Record(str(image), category, "train" if row["split"] == "train" else "test", label, defect, mask))
    if not records:
        raise DatasetLayoutError(f"{split_csv} lists no images of category {category!r}; check the category name.")
    return records


def read_folder(root: Path, category: str) -> list[Record]:
    base = _require_dir(root / category, f"category folder '{category}'", "folder")
    records = [Record(str(p), category, "train", 0, "good", "") for p in _images(_require_dir(base / "train" / "good", "train/good (normal images)", "folder"))]
    if (base / "test").is_dir():
        records += _test_records(base / "test", category, base / "masks", ("_mask", ""))
    return records


READERS: dict[str, Callable[[Path, str], list[Record]]] = {
    "demo": read_mvtec,
    "mvtec": read_mvtec,
    "mpdd": read_mvtec,
    "btad": read_btad,
    "visa": read_visa,
    "folder": read_folder,
}


# Where each layout keeps the normal images a model learns from (new confirmed-good parts go there).
TRAIN_GOOD = {"demo": "train/good", "mvtec": "train/good", "mpdd": "train/good", "btad": "train/ok", "folder": "train/good"}


def train_good_folder(name: str, root: str | Path, category: str) -> Path:
    """The folder of a category's normal training images in layout ``name``."""
    if name not in TRAIN_GOOD:
        raise ValueError(f"the {name!r} layout lists its training images in a file, so new normal images cannot just be added to a folder; "
                         "copy the dataset into the folder layout (dataset.name: folder: <category>/train/good, <category>/test/...) to grow it")
    return Path(root) / category / TRAIN_GOOD[name]


def read_layout(name: str, root: str | Path, category: str) -> list[Record]:
    if name not in READERS:
        raise ValueError(f"Unknown dataset layout {name!r}; choose one of {', '.join(READERS)} (params.yaml dataset.name).")
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(
            f"Dataset root {root} does not exist. Set dataset.root in params.yaml to the folder holding the "
            f"{name} categories" + (" (run `urd demo-data` to generate the demo)" if name == "demo" else "") + "."
        )
    return READERS[name](root, category)
