"""The drift loop's flows on a real (temporary) Prefect server: the monitor reports every camera,
raises one ``urd.drift.detected`` event for the camera that changed, and the response, with too
few reviews, widens the review band and asks for the rest."""

from __future__ import annotations

import json
import time

import cv2
import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from urd.service.ledger import Ledger, NewInspection
from urd.service.models import bundle_digest
from urd.service.store import ImageStore


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


def _drift_events(api: str, seconds: float = 30) -> list[dict]:
    deadline = time.monotonic() + seconds
    while True:
        response = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"prefix": ["urd.drift."]}, "order": "ASC"}, "limit": 50})
        response.raise_for_status()
        events = response.json()["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no {key} artifact"
    return found[-1].data


def test_monitor_raises_one_event_for_the_brighter_camera_and_respond_asks_for_reviews(packaged, tmp_path, monkeypatch, prefect_api,
                                                                                        isolated_mlflow_uris):
    from pipeline.loop import MONITOR_ARTIFACT, RESPOND_ARTIFACT, monitor, respond
    from urd.calibrate import review_threshold

    bundle = packaged / "bundle"
    metadata = json.loads((bundle / "metadata.json").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "dataset": {"categories": ["widget"]},
        "serve": {"ledger": f"sqlite:///{tmp_path / 'ledger.db'}", "image_store": "images"},
        "monitor": {"min_parts": 40, "window_hours": 1, "widen_review_to": 0.5},
        "retrain": {"min_new_normals": 5},
    }))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.upgrade()
    store = ImageStore(tmp_path / "images", 90)
    digest = bundle_digest(bundle)
    calibration = metadata["thresholds"]
    threshold = ledger.add_threshold_version("widget", digest, review_threshold(calibration), calibration["image_threshold"], "calibration", "bundle")
    manifest = pd.read_csv(packaged / "model" / "manifest.csv")
    images = [cv2.imread(p) for p in manifest.loc[manifest["split"] == "train", "path"]]
    rng = np.random.default_rng(0)
    items = []
    for camera, gain in (("cam-ok", 1.0), ("cam-bright", 1.4)):
        for i in range(50):
            image = np.clip(images[i % len(images)].astype(np.float32) * gain, 0, 255).astype(np.uint8)
            items.append(NewInspection(category="widget", line="L1", camera=camera, part_id=f"{camera}-{i}", client_key=None,
                                       image_sha256=store.put(cv2.imencode(".png", image)[1].tobytes()), image_width=64, image_height=64,
                                       model_name=f"bundle:{bundle}", model_version="local", model_alias=None, bundle_digest=digest,
                                       threshold_version=threshold.id, score=float(rng.choice(metadata["thresholds"]["val_scores"])),
                                       normalized_score=0.5, decision="accept", latency_ms=1.0))
    recorded = ledger.add_inspections(items)

    result = monitor(root=str(tmp_path))
    assert result["alarms"] == ["urd.drift.detected"] and result["categories"]["widget"] == ["cam-bright: drift", "cam-ok: stable"]
    report = (tmp_path / "reports/monitor/report.md").read_text()
    assert "| widget | cam-bright | 50 |" in report and "**DRIFT: camera or lighting**" in report and "| widget | cam-ok | 50 |" in report
    assert (tmp_path / "reports/monitor/widget.png").read_bytes()[:4] == b"\x89PNG"
    [event] = _drift_events(prefect_api)
    assert event["event"] == "urd.drift.detected" and event["resource"]["prefect.resource.id"] == "urd.camera.widget.cam-bright"
    assert event["payload"]["cause"] == "camera or lighting" and event["payload"]["evidence"]["images"]["brightness"]["relative_change"] > 0.2
    # a second run while the drift lasts raises nothing new
    assert monitor(root=str(tmp_path))["alarms"] == []

    assert "| widget | cam-bright |" in _artifact(MONITOR_ARTIFACT)
    # the response: no confirmed-good part waits, so it asks for 5 reviews and widens the band
    answer = respond("widget", "cam-bright", root=str(tmp_path))
    assert answer == {"category": "widget", "action": "waiting", "new_normals": 0, "needed": 5}
    assert "Please review 5 more parts of widget" in _artifact(RESPOND_ARTIFACT)
    row = ledger.latest_threshold("widget", digest)
    assert row.source == "drift" and row.review_threshold < review_threshold(calibration) and row.image_threshold == calibration["image_threshold"]
    assert [e.event for e in ledger.events("widget")] == ["drift", "drift_waiting"]
    # five reviews later the monitor says the drift is reviewed (the trigger then runs respond again)
    for inspection in [i for i in recorded if i.camera == "cam-bright"][:5]:
        ledger.add_verdict(inspection.id, "good", "ann")
    assert monitor(root=str(tmp_path))["alarms"] == ["urd.drift.reviewed"]
    ledger.engine.dispose()
