"""The inspection service in-process (FastAPI's test client, SQLite ledger): the scores `urd predict`
gives, three-way decisions and threshold versions, the ledger, refusals of bad uploads and of
callers without the right token, overload, a ledger that is down, the challenge-set check on a swap,
verdicts from the API and the review page, and the line clients."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from urd.config import ServeParams
from urd.inference import Predictor
from urd.service.app import ServiceConfig, create_app
from urd.service.client import InspectClient, watch_once
from urd.service.ledger import Inspection, ModelEvent, ThresholdVersion, Verdict, make_engine
from urd.service.models import BundleSource
from urd.service.security import csrf_token
from urd.service.store import ImageStore

TOKENS = {"line": "line-token-0123456789", "reviewer": "reviewer-token-0123456789", "admin": "admin-token-0123456789"}


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


@pytest.fixture()
def tokens(monkeypatch):
    for role, token in TOKENS.items():
        monkeypatch.setenv(f"URD_TOKENS_{role.upper()}", f"{role}-1:{token}")


def make_service(tmp: Path, bundle: Path, **serve) -> tuple:
    s = ServeParams(ledger=f"sqlite:///{tmp / 'ledger.db'}", image_store=str(tmp / "images"), tokens=str(tmp / "tokens.json"), **serve)
    app = create_app(ServiceConfig(["widget"], BundleSource({"widget": bundle}), s, poll=False))
    return app, app.state.service


@pytest.fixture()
def served(packaged, tmp_path, tokens):
    bundle = tmp_path / "bundle"
    shutil.copytree(packaged / "bundle", bundle)
    app, service = make_service(tmp_path, bundle)
    with TestClient(app) as client:
        yield client, service, bundle


def test_files(packaged) -> list[Path]:
    manifest = pd.read_csv(packaged / "model" / "manifest.csv")
    return [Path(p) for p in manifest.loc[manifest["split"] == "test", "path"]]


test_files.__test__ = False  # a helper, not a test


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def test_service_scores_equal_predict_and_every_decision_is_recorded(served, packaged):
    client, service, bundle = served
    files = test_files(packaged)
    expected = {str(r.path): r for r in Predictor(bundle).predict(files)}
    ids = []
    for path in files:
        response = client.post("/v1/inspect/widget", content=path.read_bytes(), headers=auth("line"), params={"line": "L1", "part_id": path.stem})
        assert response.status_code == 200, response.text
        body = response.json()
        want = expected[str(path)]
        assert body["score"] == pytest.approx(want.score, abs=1e-5)
        assert body["decision"] == want.decision
        assert body["model"]["version"] == "local" and len(body["model"]["bundle_digest"]) == 64
        ids.append(body["id"])
    assert service.ledger.count(Inspection) == len(files)
    record = client.get(f"/v1/inspections/{ids[0]}", headers=auth("reviewer")).json()
    assert record["line"] == "L1" and record["part_id"] == files[0].stem and record["latency_ms"] > 0
    assert client.get(f"/v1/inspections/{ids[0]}/image", headers=auth("line")).content == files[0].read_bytes()
    overlay = client.get(f"/v1/inspections/{ids[0]}/overlay", headers=auth("line"))
    assert overlay.status_code == 200 and cv2.imdecode(np.frombuffer(overlay.content, np.uint8), 1).shape == (64, 64, 3)
    # the image store is content-addressed: the bytes sit under their sha256
    assert service.store.get(record["image"]["sha256"]) == files[0].read_bytes()
    metrics = client.get("/metrics", headers=auth("line")).text
    assert 'urd_decisions_total{category="widget"' in metrics and "urd_request_seconds_bucket" in metrics
    # multipart and batch uploads record too
    multipart = client.post("/v1/inspect/widget", files={"image": ("a.png", files[0].read_bytes(), "image/png")}, data={"camera": "C2"},
                            headers=auth("line"))
    assert multipart.status_code == 200 and multipart.json()["camera"] == "C2"
    batch = client.post("/v1/inspect/widget/batch", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in files[:3]],
                        headers=auth("line"))
    assert [r["score"] for r in batch.json()["results"]] == pytest.approx([expected[str(p)].score for p in files[:3]], abs=1e-5)
    assert service.ledger.count(Inspection) == len(files) + 4


def test_three_way_decisions_follow_a_threshold_change_without_restart(served, packaged):
    client, service, _ = served
    files = test_files(packaged)
    scores = sorted(client.post("/v1/inspect/widget", content=p.read_bytes(), headers=auth("line")).json()["score"] for p in files)
    first_version = service.book.thresholds["widget"].version
    low, high = scores[len(scores) // 3], scores[2 * len(scores) // 3]
    assert client.put("/v1/admin/thresholds/widget", json={"review_threshold": low, "image_threshold": high}, headers=auth("reviewer")).status_code == 403
    bad = client.put("/v1/admin/thresholds/widget", json={"review_threshold": high, "image_threshold": low}, headers=auth("admin"))
    assert bad.status_code == 422 and "must not be above" in bad.text
    changed = client.put("/v1/admin/thresholds/widget", json={"review_threshold": low, "image_threshold": high, "note": "trial"},
                         headers=auth("admin")).json()
    assert changed["version"] > first_version
    seen = {}
    for path in files:
        body = client.post("/v1/inspect/widget", content=path.read_bytes(), headers=auth("line")).json()
        assert body["threshold_version"] == changed["version"]
        assert body["decision"] == ("reject" if body["score"] >= high else "review" if body["score"] >= low else "accept")
        seen[body["decision"]] = seen.get(body["decision"], 0) + 1
    assert set(seen) == {"accept", "review", "reject"}
    with service.ledger.session() as session:
        versions = session.query(ThresholdVersion).order_by(ThresholdVersion.id).all()
    assert [(v.source, v.set_by) for v in versions] == [("calibration", "bundle"), ("admin", "admin-1")]


def test_a_retried_upload_is_recorded_once(served, packaged):
    client, service, _ = served
    data = test_files(packaged)[0].read_bytes()
    headers = auth("line") | {"Idempotency-Key": "cam1/part-7"}
    first = client.post("/v1/inspect/widget", content=data, headers=headers).json()
    again = client.post("/v1/inspect/widget", content=data, headers=headers).json()
    assert again["id"] == first["id"] and again["replayed"] and service.ledger.count(Inspection) == 1


def test_tokens_are_required_on_every_route_but_health(served):
    client, _, _ = served
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["ready"]
    assert client.post("/v1/inspect/widget", content=b"x").status_code == 401
    assert client.post("/v1/inspect/widget", content=b"x", headers={"Authorization": "Bearer not-a-token-at-all"}).status_code == 401
    assert client.post("/v1/inspect/widget", content=b"x", headers=auth("reviewer")).status_code == 403
    assert client.get("/metrics").status_code == 401
    assert client.post("/v1/admin/reload", headers=auth("line")).status_code == 403
    assert client.get("/v1/inspections/abc").status_code == 401
    assert client.get("/v1/inspections/abc", headers=auth("line")).status_code == 404
    assert client.post("/v1/inspect/nope", content=b"x", headers=auth("line")).status_code == 404
    # the review page: no session -> the sign-in page; a line token may not sign in
    assert client.get("/review", follow_redirects=False).headers["location"] == "/review/login"
    assert client.post("/review/login", data={"token": TOKENS["line"]}).status_code == 401


@pytest.mark.parametrize("case", ["empty", "corrupt", "truncated_png", "truncated_jpeg", "text", "sixteen_bit", "grayscale", "huge_pixels", "huge_bytes"])
def test_bad_uploads_are_refused_naming_the_problem_and_the_service_keeps_serving(served, packaged, case):
    client, service, _ = served
    good = test_files(packaged)[0].read_bytes()
    rgb = cv2.imread(str(test_files(packaged)[0]))
    ok, jpeg = cv2.imencode(".jpg", rgb)
    uploads = {
        "empty": (b"", 422, "empty"),
        "corrupt": (good[:40] + bytes(200) + good[240:], 422, ""),
        "truncated_png": (good[: len(good) // 2], 422, "truncated"),
        "truncated_jpeg": (jpeg.tobytes()[:-600], 422, "truncated"),
        "text": (b"hello, this is not an image" * 10, 422, "not a readable image"),
        "sixteen_bit": (png((rgb.astype(np.uint16) * 257)), 422, "16-bit"),
        "grayscale": (png(rgb[..., 0]), 422, "grayscale"),
        "huge_pixels": (png(np.zeros((3000, 3000), np.uint8)), 413, "pixels"),
        "huge_bytes": (bytes(3_000_000), 413, "limit"),
    }
    service.config.serve.max_pixels = 4_000_000
    service.config.serve.max_upload_bytes = 2_000_000
    data, status, words = uploads[case]
    response = client.post("/v1/inspect/widget", content=data, headers=auth("line"))
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert service.ledger.count(Inspection) == 0 and not list(Path(service.store.root).rglob("*/*/*"))
    assert client.post("/v1/inspect/widget", content=good, headers=auth("line")).status_code == 200


def test_over_capacity_answers_503_with_retry_after_and_recovers(packaged, tmp_path, tokens):
    app, service = make_service(tmp_path, packaged / "bundle", queue_size=1, max_batch=1, max_wait_ms=0)
    slow = service.batcher.score

    def slow_score(model, batch):
        time.sleep(0.3)
        return slow(model, batch)

    service.batcher.score = slow_score
    data = test_files(packaged)[0].read_bytes()
    with TestClient(app) as client:
        statuses, retry = [], []

        def send():
            r = client.post("/v1/inspect/widget", content=data, headers=auth("line"))
            statuses.append(r.status_code)
            retry.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
        assert all(r == "1" for s, r in zip(statuses, retry) if s == 503)
        assert service.ledger.count(Inspection) == statuses.count(200)
        assert client.post("/v1/inspect/widget", content=data, headers=auth("line")).status_code == 200
        assert 'urd_overload_total{reason="queue_full"}' in client.get("/metrics", headers=auth("admin")).text


def test_a_ledger_that_is_down_answers_503_and_records_nothing_half(served, packaged):
    client, service, _ = served
    data = test_files(packaged)[0].read_bytes()
    working = service.ledger.engine
    service.ledger.engine = make_engine("postgresql+psycopg://urd@127.0.0.1:1/none")  # nothing listens there: connection refused
    service.ledger.session.configure(bind=service.ledger.engine)
    response = client.post("/v1/inspect/widget", content=data, headers=auth("line"))
    assert response.status_code == 503 and "ledger" in response.json()["detail"] and response.headers["retry-after"] == "5"
    assert client.get("/readyz").status_code == 503
    service.ledger.engine = working
    service.ledger.session.configure(bind=working)
    assert client.post("/v1/inspect/widget", content=data, headers=auth("line")).status_code == 200
    assert service.ledger.count(Inspection) == 1


def _tamper(bundle: Path) -> None:
    challenge = json.loads((bundle / "challenge.json").read_text())
    challenge["images"][0]["scores"]["onnx"] += 1.0
    (bundle / "challenge.json").write_text(json.dumps(challenge))


def test_a_model_failing_its_challenge_set_is_refused_and_the_old_one_keeps_serving(served, packaged):
    client, service, bundle = served
    before = service.book.models["widget"]
    _tamper(bundle)
    assert client.post("/v1/admin/reload", headers=auth("admin")).json() == {"widget": "refused"}
    assert service.refresh("widget") == "refused"  # a poll neither checks nor records the same refused version again
    assert service.book.models["widget"] is before
    ready = client.get("/readyz").json()
    assert "failed its challenge set" in ready["problems"]["widget"] and "still serving" in ready["problems"]["widget"]
    assert client.post("/v1/inspect/widget", content=test_files(packaged)[0].read_bytes(), headers=auth("line")).json()["model"]["bundle_digest"] == before.digest
    with service.ledger.session() as session:
        assert [e.event for e in session.query(ModelEvent).order_by(ModelEvent.id)] == ["serving", "refused"]
    # a fixed bundle is taken on the next reload
    shutil.copy2(packaged / "bundle" / "challenge.json", bundle / "challenge.json")
    assert client.post("/v1/admin/reload", headers=auth("admin")).json() == {"widget": "unchanged"}
    assert client.post("/v1/admin/challenge", headers=auth("admin")).json()["widget"]["passed"]


def test_readiness_fails_at_start_when_the_challenge_set_fails(packaged, tmp_path, tokens):
    bundle = tmp_path / "bundle"
    shutil.copytree(packaged / "bundle", bundle)
    _tamper(bundle)
    app, _ = make_service(tmp_path, bundle)
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "failed its challenge set" in ready.json()["problems"]["widget"]
        response = client.post("/v1/inspect/widget", content=b"x", headers=auth("line"))
        assert response.status_code == 503 and "not being served" in response.json()["detail"]


def test_verdicts_from_the_api_and_the_review_page_with_csrf(served, packaged):
    client, service, _ = served
    files = test_files(packaged)
    client.put("/v1/admin/thresholds/widget", json={"review_threshold": -1e9, "image_threshold": 1e9}, headers=auth("admin"))
    ids = [client.post("/v1/inspect/widget", content=p.read_bytes(), headers=auth("line"), params={"line": "L2"}).json()["id"] for p in files[:3]]
    assert client.post(f"/v1/inspections/{ids[0]}/verdict", json={"verdict": "good"}, headers=auth("line")).status_code == 403
    assert client.post(f"/v1/inspections/{ids[0]}/verdict", json={"verdict": "maybe"}, headers=auth("reviewer")).status_code == 422
    assert client.post(f"/v1/inspections/{ids[0]}/verdict", json={"verdict": "defect", "note": "scratch"}, headers=auth("reviewer")).status_code == 200
    # the page: sign in, the queue shows the two parts not yet reviewed, newest first
    assert client.post("/review/login", data={"token": TOKENS["reviewer"]}, follow_redirects=False).status_code == 303
    page = client.get("/review").text
    assert ids[0] not in page and page.index(ids[2]) < page.index(ids[1])
    assert "L2" in page and client.get("/static/review.js").status_code == 200
    assert client.post(f"/review/{ids[1]}/verdict", data={"verdict": "good"}).status_code == 403  # no CSRF field
    assert client.post(f"/review/{ids[1]}/verdict", data={"verdict": "good", "csrf": "0" * 32}).status_code == 403
    done = client.post(f"/review/{ids[1]}/verdict", data={"verdict": "good", "csrf": csrf_token(TOKENS["reviewer"])}, follow_redirects=False)
    assert done.status_code == 303
    with service.ledger.session() as session:
        verdicts = [(v.inspection_id, v.verdict, v.reviewer, v.note) for v in session.query(Verdict).order_by(Verdict.id)]
    assert verdicts == [(ids[0], "defect", "reviewer-1", "scratch"), (ids[1], "good", "reviewer-1", None)]
    assert ids[1] not in client.get("/review").text and ids[1] in client.get("/review?show=all").text
    dashboard = client.get("/review/dashboard/widget").text
    assert "<svg" in dashboard and "good 1, defect 1" in dashboard


def test_tokens_file_is_written_once_and_private(packaged, tmp_path):
    app, service = make_service(tmp_path, packaged / "bundle")
    file = tmp_path / "tokens.json"
    tokens = json.loads(file.read_text())
    assert set(tokens) == {"line", "reviewer", "admin"} and file.stat().st_mode & 0o077 == 0
    make_service(tmp_path, packaged / "bundle")
    assert json.loads(file.read_text()) == tokens  # never replaced


def test_image_store_prunes_by_age_only(tmp_path):
    store = ImageStore(tmp_path / "s", retention_days=1)
    old, new = store.put(b"old bytes"), store.put(b"new bytes")
    path = store.path(old)
    past = time.time() - 2 * 86400
    import os

    os.utime(path, (past, past))
    assert store.prune() == 1 and store.get(old) is None and store.get(new) == b"new bytes"
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_watch_inspects_each_file_once_and_survives_a_restart(served, packaged, tmp_path):
    client, service, _ = served
    drop = tmp_path / "drop"
    drop.mkdir()
    files = [shutil.copy2(f, tmp_path / f"part{i}.png") for i, f in enumerate(test_files(packaged)[:3])]
    files = [Path(f) for f in files]
    for f in files:
        shutil.copy2(f, drop / f.name)
    (drop / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    past = time.time() - 10
    for f in drop.iterdir():
        import os

        os.utime(f, (past, past))
    line = InspectClient("http://testserver", "widget", TOKENS["line"], line="L1", retries=0)
    line.http = client
    client.headers.update(auth("line"))
    assert watch_once(line, drop, settle_seconds=1) == 4
    assert sorted(p.name for p in (drop / "done").glob("*.png")) == sorted(f.name for f in files)
    assert [p.name for p in (drop / "failed").glob("*.png")] == ["broken.png"]
    assert "truncated" in json.loads((drop / "failed" / "broken.png.json").read_text())["error"]
    # a restart after the answer but before the move: the file comes back, the service replays the record
    shutil.copy2(files[0], drop / files[0].name)
    os.utime(drop / files[0].name, (past, past))
    assert watch_once(line, drop, settle_seconds=1) == 1
    assert service.ledger.count(Inspection) == 3
    replay = json.loads(sorted((drop / "done").glob(f"{files[0].stem}_1*.json"))[0].read_text())
    assert replay["replayed"]


def test_bundle_digest_follows_the_files_and_is_not_recomputed_for_unchanged_ones(packaged, tmp_path, monkeypatch):
    from urd.service import models

    bundle = tmp_path / "bundle"
    shutil.copytree(packaged / "bundle", bundle)
    first = models.bundle_digest(bundle)
    calls, sha256 = [], models.hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: calls.append(1) or sha256(*a))
    assert models.bundle_digest(bundle) == first and not calls  # remembered by file signature
    metadata = json.loads((bundle / "metadata.json").read_text())
    metadata["thresholds"]["image_threshold"] += 1.0
    (bundle / "metadata.json").unlink()
    (bundle / "metadata.json").write_text(json.dumps(metadata))  # a new file (new inode): hashed again
    changed = models.bundle_digest(bundle)
    assert changed != first and len(calls) == 1


def test_a_batch_waits_only_for_requests_on_the_way():
    import asyncio

    from urd.service.batcher import MicroBatcher

    sizes: list[int] = []

    def score(model, batch):
        sizes.append(len(batch))
        return np.zeros((len(batch), 2, 2)), np.arange(len(batch), dtype=float)

    async def main() -> list:
        batcher = MicroBatcher(score, lambda jobs, maps, scores: [(j.payload, s) for j, s in zip(jobs, scores)], max_batch=8,
                               max_wait_s=0.5, queue_size=8)
        batcher.start(["c"])
        started = time.perf_counter()
        alone = await batcher.submit("c", "model", np.zeros(3), "alone")
        waited = time.perf_counter() - started

        async def decoded_later(k: int):
            with batcher.expect("c"):  # decoding takes a while
                await asyncio.sleep(0.05 * k)
            return await batcher.submit("c", "model", np.zeros(3), k)

        together = await asyncio.gather(*(decoded_later(k) for k in range(3)))
        await batcher.stop()
        return [alone, waited, together]

    alone, waited, together = asyncio.run(main())
    assert alone == ("alone", 0.0) and waited < 0.25  # nobody else on the way: no max_wait
    assert together == [(0, 0.0), (1, 1.0), (2, 2.0)] and sizes == [1, 3]  # the first waited for the two being decoded


def test_the_served_models_challenge_set_is_run_again_on_demand(served, packaged):
    client, service, bundle = served
    _tamper(bundle)  # as if the runtime under the served model had changed its scores
    answer = client.post("/v1/admin/challenge", headers=auth("admin")).json()["widget"]
    assert not answer["passed"] and "recorded" in answer["problems"][0]
    ready = client.get("/readyz").json()
    assert "no longer reproduces its challenge set" in ready["problems"]["widget"] and ready["models"]["widget"]  # still serving
    with service.ledger.session() as session:
        assert [e.event for e in session.query(ModelEvent).order_by(ModelEvent.id)] == ["serving", "challenge_failed"]
    shutil.copy2(packaged / "bundle" / "challenge.json", bundle / "challenge.json")
    assert client.post("/v1/admin/challenge", headers=auth("admin")).json()["widget"]["passed"]
    assert "widget" not in client.get("/readyz").json()["problems"]
    assert client.post("/v1/admin/challenge", headers=auth("line")).status_code == 403
