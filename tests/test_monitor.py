"""The drift monitor on the ledger: per camera, a lighting change is told from a stable camera, a
camera with too few parts is not tested, and parts another model decided are left out."""

from __future__ import annotations

import json
from datetime import timedelta

import cv2
import numpy as np
import pandas as pd

from urd.drift import read_reference
from urd.service.ledger import Ledger, NewInspection, utcnow
from urd.service.models import bundle_digest
from urd.service.monitor import monitor_category
from urd.service.store import ImageStore


def test_a_brighter_camera_is_reported_as_a_lighting_change_and_the_others_are_quiet(packaged, tmp_path):
    bundle = packaged / "bundle"
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert set(read_reference(bundle)) == {"brightness", "contrast", "sharpness"}
    manifest = pd.read_csv(packaged / "model" / "manifest.csv")
    images = [cv2.imread(p) for p in manifest.loc[manifest["split"] == "train", "path"]]
    val_scores = np.asarray(metadata["thresholds"]["val_scores"])
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.upgrade()
    store = ImageStore(tmp_path / "images", 90)
    digest = bundle_digest(bundle)
    threshold = ledger.add_threshold_version("widget", digest, 0.0, 1.0, "calibration", "bundle")
    rng = np.random.default_rng(0)

    def parts(camera: str, n: int, gain: float = 1.0, model_digest: str = digest) -> list[NewInspection]:
        out = []
        for i in range(n):
            image = np.clip(images[i % len(images)].astype(np.float32) * gain, 0, 255).astype(np.uint8)
            sha = store.put(cv2.imencode(".png", image)[1].tobytes())
            out.append(NewInspection(category="widget", line="L1", camera=camera, part_id=f"{camera}-{i}", client_key=None, image_sha256=sha,
                                     image_width=64, image_height=64, model_name="m", model_version="1", model_alias=None,
                                     bundle_digest=model_digest, threshold_version=threshold.id, score=float(rng.choice(val_scores)),
                                     normalized_score=0.5, decision="accept", latency_ms=1.0))
        return out

    ledger.add_inspections(parts("cam-ok", 60) + parts("cam-bright", 60, gain=1.4) + parts("cam-new", 10) + parts("cam-old-model", 60, 1.4, "e" * 64))
    reports = {r.camera: r for r in monitor_category(ledger, store, "widget", bundle, metadata, utcnow() - timedelta(hours=1), alpha=1e-3,
                                                      min_parts=50)}
    assert set(reports) == {"cam-ok", "cam-bright", "cam-new"}  # the old model's parts are not this model's scores
    assert not reports["cam-ok"].assessment.drift
    bright = reports["cam-bright"].assessment
    assert bright.drift and bright.cause == "camera or lighting" and bright.evidence["images"]["brightness"]["relative_change"] > 0.2
    assert bright.alpha_per_test == 1e-3 / 2 / 5  # two cameras tested, five tests each
    assert reports["cam-new"].assessment is None and reports["cam-new"].parts == 10
    # a window by parts: each camera's latest 55 (cam-new keeps its 10)
    windowed = {r.camera: r.parts for r in monitor_category(ledger, store, "widget", bundle, metadata, utcnow() - timedelta(hours=1),
                                                             min_parts=50, window_parts=55)}
    assert windowed == {"cam-ok": 55, "cam-bright": 55, "cam-new": 10}
    ledger.engine.dispose()


def _report(camera: str, drift: bool | None, parts: int = 200):
    from urd.drift import Assessment
    from urd.service.monitor import CameraReport

    assessment = None if drift is None else Assessment(drift, "camera or lighting" if drift else "none", 1e-4, {"parts": parts})
    return CameraReport(camera, parts, assessment)


def test_a_drift_is_raised_once_cleared_when_quiet_and_reviewed_when_the_reviews_are_in(tmp_path):
    from urd.service.monitor import drift_transitions, new_normals

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.upgrade()
    digest, model = "d" * 64, ("urd-demo-widget", "3")
    threshold = ledger.add_threshold_version("widget", digest, 0.5, 1.0, "calibration", "bundle")

    def parts(camera: str, n: int) -> list[str]:
        rows = ledger.add_inspections([NewInspection(category="widget", line="L1", camera=camera, part_id=None, client_key=None,
                                                     image_sha256=f"{camera}{k}".ljust(64, "0"), image_width=8, image_height=8, model_name=model[0],
                                                     model_version=model[1], model_alias=None, bundle_digest=digest, threshold_version=threshold.id,
                                                     score=0.7, normalized_score=0.5, decision="review", latency_ms=1.0) for k in range(n)])
        return [r.id for r in rows]

    def confirm(ids: list[str]) -> None:
        for inspection_id in ids:
            ledger.add_verdict(inspection_id, "good", "ann")

    def run(reports):
        return [(name, p["camera"]) for name, p in drift_transitions(ledger, "widget", digest, model, reports, 3)]

    assert run([_report("c1", False), _report("c2", None, 5)]) == []
    assert run([_report("c1", True), _report("c2", False)]) == [("urd.drift.detected", "c1")]
    assert run([_report("c1", True)]) == []  # still drifting: not raised again every run
    # the response asked for reviews; once 3 confirmed-good parts of c1 wait to be harvested, the monitor says so (once)
    ledger.add_model_event("widget", "drift_waiting", *model, digest, {"camera": "c1", "needed": 3})
    confirm(parts("c2", 4) + parts("c1", 2))  # another camera's parts do not count
    assert new_normals(ledger, "widget") == 6 and new_normals(ledger, "widget", "c1") == 2 and run([_report("c1", True)]) == []
    confirm(parts("c1", 1))
    assert run([_report("c1", True)]) == [("urd.drift.reviewed", "c1")]
    assert run([_report("c1", True)]) == []
    assert run([_report("c1", False)]) == []  # quiet again: cleared, so a later drift is a new one
    assert [e.event for e in ledger.events("widget")] == ["drift", "drift_waiting", "drift_reviewed", "drift_cleared"]
    assert run([_report("c1", True)]) == [("urd.drift.detected", "c1")]
    # another model's record is its own: the new model's first drift is raised
    assert [n for n, _ in drift_transitions(ledger, "widget", "e" * 64, ("urd-demo-widget", "4"), [_report("c1", True)], 3)] == [
        "urd.drift.detected"]
    detected = [e for e in ledger.events("widget") if e.event == "drift"][0]
    assert detected.detail["cause"] == "camera or lighting" and detected.detail["alpha_per_test"] == 1e-4
    ledger.engine.dispose()


def test_the_false_alarm_budget_is_split_over_runs_and_categories_and_widening_lowers_the_review_edge(packaged, tmp_path):
    from pipeline.loop import alpha_per_run, widen_review
    from urd.config import parse_params

    assert alpha_per_run(parse_params({}), 2) == 0.01 / 24 / 2
    assert alpha_per_run(parse_params({"monitor": {"every_minutes": 15, "false_alarms_per_day": 0.05}}), 1) == 0.05 / 96
    bundle = packaged / "bundle"
    thresholds = json.loads((bundle / "metadata.json").read_text())["thresholds"]
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.upgrade()
    served = ("bundle:x", "local", bundle_digest(bundle), bundle)
    note = widen_review(ledger, "widget", served, 0.5)
    row = ledger.latest_threshold("widget", served[2])
    assert row.source == "drift" and row.image_threshold == thresholds["image_threshold"]
    assert row.review_threshold == np.quantile(thresholds["val_scores"], 0.5, method="lower") and "lowered" in note
    assert "already wide" in widen_review(ledger, "widget", served, 0.4) and len(ledger.events()) == 0
    ledger.engine.dispose()
