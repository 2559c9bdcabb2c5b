"""The field set and the provenance of harvested data: files that travel with a dataset, so a model
can say which reviewed parts from the line it learned from without reaching the ledger.

    <field_root>/<dataset>/<category>/defect/<sha256>.<ext>   confirmed defects (never training data)
    <field_root>/<dataset>/<category>/labels.csv              one row per confirmed defect
    <dataset root>/<category>/harvests.csv                    one row per confirmed-good part added to training

Written by :mod:`urd.service.harvest`; read by the package stage (a model's lineage and card).
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
    rows = {row["file"]: row for row in read_rows(Path(dataset_root) / category / PROVENANCE)}
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
