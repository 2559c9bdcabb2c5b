"""The field set and the provenance of harvested data: files that travel with a dataset, so a model
can say which reviewed parts from the line it learned from without reaching the ledger.

    <field_root>/<dataset>/<category>/defect/<sha256>.<ext>   confirmed defects (never training data)
    <field_root>/<dataset>/<category>/labels.csv              one row per confirmed defect
    <dataset root>/<category>/harvests.csv                    one row per harvested part: confirmed good
                                                              (added to training) and confirmed defect (the field set)

Written by :mod:`urd.service.harvest`; read by the calibrate stage (:func:`field_defect_rows`: the
field set as the dataset folder lists it, so a harvest of defects changes that category's data,
and DVC reruns its calibration and nothing upstream) and the package stage (a model's lineage and
card).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

LABELS = "labels.csv"
PROVENANCE = "harvests.csv"
LABEL_COLUMNS = ("file", "inspection_id", "harvest_id", "verdict", "reviewer", "verdict_at", "inspected_at", "score", "model_name",
                 "model_version", "line", "camera", "part_id")


def field_set_folder(field_root: str | Path, dataset: str, category: str) -> Path:
    return Path(field_root) / dataset / category


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def field_provenance(manifest, dataset_root: str | Path, category: str, field_folder: str | Path | None = None) -> dict[str, Any]:
    """What of a model's data came from the line: confirmed-good parts among its training and val
    images (by file name, from the category's harvests.csv), the harvests and the span of
    inspections they hold, and the confirmed defects of its field set."""
    rows = {row["file"]: row for row in read_rows(Path(dataset_root) / category / PROVENANCE) if row.get("verdict", "good") == "good"}
    names = manifest["path"].map(lambda p: Path(p).name)
    used = manifest[names.isin(rows) & manifest["split"].isin(["train", "val"])]
    taken = [rows[Path(p).name] for p in used["path"]]
    defects = read_rows(Path(field_folder) / LABELS) if field_folder is not None else []
    times = sorted(r["inspected_at"] for r in [*taken, *defects] if r.get("inspected_at"))
    return {
        "field_train_images": int((used["split"] == "train").sum()),
        "field_val_images": int((used["split"] == "val").sum()),
        "field_defects": len(defects),
        "harvest_ids": sorted({r["harvest_id"] for r in [*taken, *defects] if r.get("harvest_id")}),
        "ledger_from": times[0] if times else None,
        "ledger_to": times[-1] if times else None,
    }


def field_defect_rows(dataset_root: str | Path, category: str, field_folder: str | Path):
    """The category's field set as manifest rows (``split`` "field", ``label`` 1, no mask): the
    confirmed defects its ``harvests.csv`` lists, each checked against the file of the field set
    (named by its sha256). Empty when nothing was harvested."""
    import hashlib

    import pandas as pd

    listed = [row for row in read_rows(Path(dataset_root) / category / PROVENANCE) if row.get("verdict") == "defect"]
    rows = []
    for row in listed:
        path = Path(field_folder) / "defect" / row["file"]
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {Path(dataset_root) / category / PROVENANCE} lists it as a confirmed defect of the field set. Fetch the field "
                f"set (`dvc pull {field_folder}`) or, if it was deleted on purpose, remove its row from {PROVENANCE}")
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        if sha != Path(row["file"]).stem:
            raise ValueError(f"{path} changed since it was harvested (its sha256 is {sha[:12]}..., its name says otherwise): the field set holds "
                             f"the images reviewers confirmed; restore it (`dvc checkout {field_folder}`)")
        rows.append({"path": str(path), "label": 1, "split": "field", "defect_type": "field", "mask_path": "", "sha256": sha})
    return pd.DataFrame(rows, columns=["path", "label", "split", "defect_type", "mask_path", "sha256"])
