"""Harvest: reviewed inspections of a category become data.

* a part reviewers confirmed **good** goes into the category's normal training folder
  (``train/good`` in most layouts), named by its sha256: the stable val split then holds some of
  them out, as it does every normal image;
* a confirmed **defect** goes into the category's **field set**
  (``<field_root>/<dataset>/<category>/defect/``, with ``labels.csv``): labelled defects for
  calibration and the promotion gate, never training data; the test split is never touched.

Crash-safe and idempotent: each image is written to a temporary file, flushed to disk and renamed
(a reader or a crash never leaves half an image), and only then are the harvest and every record it
took committed to the ledger in one transaction, where an inspection can be harvested only once. A
harvest killed midway leaves whole files and no record; the rerun finds the same names, writes what
is missing and records the lot. Versioning the written folders (DVC) is the caller's step
(``python -m pipeline harvest``).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.field import LABEL_COLUMNS, LABELS, PROVENANCE, field_set_folder, read_rows
from ..data.layouts import train_good_folder
from ..files import atomic_write, atomic_write_text
from .ledger import Harvest, HarvestedRecord, Ledger, new_id, utcnow
from .store import ImageStore, image_type



@dataclass
class HarvestResult:
    harvest_id: str | None  # None: nothing to harvest
    category: str
    good: int = 0
    defect: int = 0
    missing: int = 0
    written: list[Path] = field(default_factory=list)  # files new on disk (the rest were there from an interrupted run)
    folders: list[Path] = field(default_factory=list)  # the folders that changed, for versioning

    def as_dict(self) -> dict[str, Any]:
        return {"harvest_id": self.harvest_id, "category": self.category, "good": self.good, "defect": self.defect, "missing": self.missing,
                "written": len(self.written), "folders": [str(f) for f in self.folders]}


def _write_durably(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _leftovers(folder: Path) -> None:
    """Remove the temporary files of an interrupted write (``.<name>.tmp``)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def harvest(ledger: Ledger, store: ImageStore, dataset: str, dataset_root: str | Path, category: str, field_root: str | Path) -> HarvestResult:
    """Take every reviewed, not yet harvested inspection of ``category`` into the dataset (see the
    module docstring). Returns what was harvested; nothing to do gives ``harvest_id=None``."""
    good_folder = train_good_folder(dataset, dataset_root, category)
    if not good_folder.is_dir():
        raise FileNotFoundError(f"{good_folder} not found: dataset.root ({dataset_root}) holds no training folder for {category!r}; "
                                "harvest writes confirmed-good parts there")
    field_folder = field_set_folder(field_root, dataset, category)
    defect_folder = field_folder / "defect"
    for folder in (good_folder, defect_folder):
        _leftovers(folder)
    pending = ledger.unharvested(category)
    result = HarvestResult(None, category)
    if not pending:
        return result
    harvest_id = new_id()
    records, labels, provenance = [], [], []
    for inspection, verdict in pending:
        data = store.get(inspection.image_sha256)
        if data is None:  # pruned by the retention: the record is taken, with no file
            result.missing += 1
            records.append(HarvestedRecord(inspection_id=inspection.id, harvest_id=harvest_id, verdict_id=verdict.id, verdict=verdict.verdict))
            continue
        folder = good_folder if verdict.verdict == "good" else defect_folder
        target = folder / f"{inspection.image_sha256}{image_type(data)[1]}"
        if not target.is_file():
            _write_durably(target, data)
            result.written.append(target)
        row = {"file": target.name, "inspection_id": inspection.id, "harvest_id": harvest_id, "verdict": verdict.verdict,
               "reviewer": verdict.reviewer, "verdict_at": verdict.created_at.isoformat(), "inspected_at": inspection.created_at.isoformat(),
               "score": inspection.score, "model_name": inspection.model_name, "model_version": inspection.model_version,
               "line": inspection.line or "", "camera": inspection.camera or "", "part_id": inspection.part_id or ""}
        if verdict.verdict == "good":
            result.good += 1
            provenance.append(row)
        else:
            result.defect += 1
            labels.append(row)
        records.append(HarvestedRecord(inspection_id=inspection.id, harvest_id=harvest_id, verdict_id=verdict.id, verdict=verdict.verdict,
                                       path=str(target)))
    if labels:
        _append_rows(field_folder / LABELS, labels)
    if provenance or labels:  # the category's list of every part it took from the line, defects included
        _append_rows(Path(dataset_root) / category / PROVENANCE, provenance + labels)
    for folder in {good_folder, defect_folder, field_folder}:
        if folder.is_dir():
            _sync_folder(folder)
    result.folders = [good_folder] + ([field_folder] if result.defect else [])
    times = [i.created_at for i, _ in pending]
    ledger.add_harvest(Harvest(id=harvest_id, created_at=utcnow(), category=category, dataset=dataset, good=result.good, defect=result.defect,
                               missing=result.missing, first_record_at=min(times), last_record_at=max(times),
                               detail={"train_good": str(good_folder), "field_set": str(field_folder), "written": len(result.written)}),
                       records)
    result.harvest_id = harvest_id
    return result


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """The CSV with these rows added (a row per file: a rerun after a crash replaces, not repeats)."""
    existing: dict[str, dict[str, Any]] = {row["file"]: row for row in read_rows(path)}
    for row in rows:
        existing[row["file"]] = row
    out = io.StringIO()
    writer = csv.DictWriter(out, LABEL_COLUMNS)  # one column set for both files
    writer.writeheader()
    writer.writerows(existing[k] for k in sorted(existing))
    atomic_write_text(path, out.getvalue())

