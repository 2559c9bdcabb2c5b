"""The drift monitor's look at the ledger: per category and camera, the recent stretch of the line
against the served model's reference (urd.drift), with the evidence a report or an event carries.

Only parts the given bundle decided are assessed (its digest in the record). The reference is the bundle's: its val scores (``metadata.json`` thresholds) and its training
images' statistics (``reference.json``, written at package time). The recent images' statistics
come from the image store. One family-wise ``alpha`` per run is split over the cameras assessed
(Bonferroni), and within a camera over its tests (urd.drift.assess); a camera with fewer than
``min_parts`` recent parts is reported as such, not tested.

What the monitor has said is kept in the ledger's model events, per category, camera and served
bundle (:func:`drift_transitions`): ``drift`` when a camera starts drifting (the one time an alarm
is raised), ``drift_cleared`` when it is quiet again, ``drift_waiting`` / ``drift_retrain`` from the
response (pipeline/loop.py) and ``drift_reviewed`` once the reviews it waited for are in.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..calibrate import review_threshold
from ..drift import IMAGE_STATISTICS, Assessment, assess, image_statistics, read_reference
from .ledger import Ledger, ModelEvent
from .models import bundle_digest
from .store import ImageStore
from .uploads import decode_upload


@dataclass
class CameraReport:
    camera: str
    parts: int
    assessment: Assessment | None  # None: too few parts to test
    models: list[str] = field(default_factory=list)  # model versions that decided these parts
    scores: list[float] = field(default_factory=list)  # the image scores assessed (or seen, when too few)


def monitor_category(ledger: Ledger, store: ImageStore | None, category: str, bundle_dir: str | Path, metadata: dict[str, Any],
                     since: datetime, alpha: float = 1e-3, min_parts: int = 100, max_images: int = 500,
                     window_parts: int | None = None) -> list[CameraReport]:
    """Assess every camera of ``category`` on the parts inspected since ``since`` (at most its
    latest ``window_parts``)."""
    calibration = metadata["thresholds"]
    reference_scores = np.asarray(calibration.get("val_scores", []), np.float64)
    if not len(reference_scores):
        raise ValueError(f"{bundle_dir}: the bundle records no val scores (thresholds.val_scores); re-package it to monitor its category")
    reference_images = read_reference(bundle_dir)
    digest = bundle_digest(bundle_dir)
    by_camera: dict[str, list] = defaultdict(list)
    for row in ledger.since(category, since):
        if row.bundle_digest == digest:  # parts another model decided are another model's scores
            by_camera[row.camera or "-"].append(row)
    if window_parts:
        by_camera = defaultdict(list, {c: rows[-window_parts:] for c, rows in by_camera.items()})
    testable = [c for c, rows in by_camera.items() if len(rows) >= min_parts]
    reports = []
    for camera in sorted(by_camera):
        rows = by_camera[camera]
        if camera not in testable:
            reports.append(CameraReport(camera, len(rows), None, scores=[r.score for r in rows]))
            continue
        recent_images = None
        if reference_images is not None and store is not None:
            stats = defaultdict(list)
            for row in rows[-max_images:]:
                data = store.get(row.image_sha256)
                if data is not None:
                    for k, v in image_statistics(decode_upload(data, len(data) + 1, 1 << 31)).items():
                        stats[k].append(v)
            recent_images = {k: np.asarray(stats[k]) for k in IMAGE_STATISTICS if stats[k]} or None
        scores = [r.score for r in rows]
        result = assess(reference_scores, np.array(scores), review_threshold(calibration),
                        reference_images if recent_images else None, recent_images, alpha=alpha / len(testable))
        reports.append(CameraReport(camera, len(rows), result, sorted({f"{r.model_name}:{r.model_version}" for r in rows}), scores))
    return reports


DRIFT_EVENTS = ("drift", "drift_cleared", "drift_waiting", "drift_reviewed", "drift_retrain")


def drift_state(ledger: Ledger, category: str, digest: str, camera: str) -> ModelEvent | None:
    """The latest drift event of a camera for the bundle ``digest`` (None: never drifted)."""
    found = [e for e in ledger.events(category)
             if e.event in DRIFT_EVENTS and e.bundle_digest == digest and (e.detail or {}).get("camera") in (camera, None)]
    return found[-1] if found else None


def new_normals(ledger: Ledger, category: str, camera: str | None = None) -> int:
    """Confirmed-good parts of the category (of ``camera``) that are reviewed and not yet
    harvested. After a drift they should show the line as it is now: harvest routinely (e.g.
    nightly), so the parts waiting are recent ones."""
    return sum(verdict.verdict == "good" and (camera is None or (inspection.camera or "-") == camera)
               for inspection, verdict in ledger.unharvested(category))


def drift_transitions(ledger: Ledger, category: str, digest: str, model: tuple[str, str], reports: list[CameraReport],
                      min_new_normals: int) -> list[tuple[str, dict[str, Any]]]:
    """Record what changed since the last run and return the alarms to raise, as (event name,
    payload): ``urd.drift.detected`` once per drift of a camera (not again every run while it
    lasts), ``urd.drift.reviewed`` once a drift that waited for reviews has ``min_new_normals``
    confirmed-good parts of that camera waiting to be harvested."""
    raised = []
    for report in reports:
        state = drift_state(ledger, category, digest, report.camera)
        last = state.event if state else None
        base = {"category": category, "camera": report.camera, "model": model[0], "version": model[1], "parts": report.parts}
        if report.assessment is None:
            continue
        if report.assessment.drift and last in (None, "drift_cleared"):
            payload = base | {"cause": report.assessment.cause, "alpha_per_test": report.assessment.alpha_per_test,
                              "evidence": report.assessment.evidence}
            ledger.add_model_event(category, "drift", model[0], model[1], digest, payload)
            raised.append(("urd.drift.detected", payload))
        elif (report.assessment.drift and last == "drift_waiting"
              and (count := new_normals(ledger, category, report.camera)) >= min_new_normals):
            payload = base | {"new_normals": count}
            ledger.add_model_event(category, "drift_reviewed", model[0], model[1], digest, payload)
            raised.append(("urd.drift.reviewed", payload))
        elif not report.assessment.drift and last not in (None, "drift_cleared"):
            ledger.add_model_event(category, "drift_cleared", model[0], model[1], digest, base)
    return raised
