"""The loop from the line back into a model, end to end on real servers (slow, tiny params).

A Prefect server, an MLflow server, `urd serve` on the registry's @production models and the
`respond` deployment served with its event trigger, over a checkout of this project with both demo
categories trained and promoted. Then: tiles' camera gets 40% brighter -> the monitor raises exactly
one drift event -> the trigger runs `respond` for tiles, which asks for reviews -> reviewers
confirm the bright parts through the service -> the monitor says so -> the trigger runs `respond`
again: harvest (versioned by DVC), retrain of tiles alone, gate, alias moved -> the service
hot-swaps to the new version (challenge set passing) -> the new model's flag rate on the bright
line is within its calibrated expectation. Widget's model, data and alias are untouched, every
part posted is in the ledger, and `dvc status` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import yaml

from .test_flows import BIN, Processes, _checkout, _free_port, _wait_http, readme_mlflow_line
from .test_service import TOKENS, auth

pytestmark = pytest.mark.slow


def _png(path: Path, gain: float = 1.0) -> bytes:
    image = cv2.imread(str(path))
    if gain != 1.0:
        image = np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


def _wait(what: str, check, seconds: float, logs: list[Path]):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.is_file()))
        time.sleep(1)


_FLOWS: dict = {}


def _flow_name(client, flow_id) -> str:
    if flow_id not in _FLOWS:
        _FLOWS[flow_id] = client.read_flow(flow_id).name
    return _FLOWS[flow_id]


def _events(api: str) -> list[dict]:
    response = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"prefix": ["urd.drift."]}, "order": "ASC"}, "limit": 50})
    response.raise_for_status()
    return response.json()["events"]


def test_a_brighter_camera_is_answered_by_a_gated_retrain_of_that_category_alone(tmp_path, isolated_mlflow_uris):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from pipeline.flows import retrain
    from pipeline.loop import alpha_per_run, monitor
    from urd.config import load_params
    from urd.service.ledger import Harvest, HarvestedRecord, Inspection, Ledger, hours_ago
    from urd.service.models import download_version
    from urd.service.monitor import monitor_category
    from urd.service.store import ImageStore

    prefect_port, mlflow_port, serve_port = _free_port(), _free_port(), _free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "URD_THREADS": "1",
    } | {f"URD_TOKENS_{role.upper()}": f"{role}-1:{token}" for role, token in TOKENS.items()}
    procs = Processes(tmp_path, env)
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PATH")}
    try:
        server, server_log = procs.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                                         tmp_path)
        mlflow_server, mlflow_log = procs.start("mlflow-server", ["bash", "-c", readme_mlflow_line(tmp_path / "srv-mlflow", mlflow_port)], tmp_path)
        _wait_http(f"{api}/health", 120, server, server_log)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 120, mlflow_server, mlflow_log)
        os.environ.update({k: env[k] for k in saved})
        checkout = _checkout(tmp_path / "checkout", tmp_path / "dvc-remote")
        params = yaml.safe_load((checkout / "params.yaml").read_text())
        params["overrides"] = {}  # both categories promotable
        params["serve"] |= {"poll_seconds": 2, "port": serve_port}
        params["monitor"] |= {"min_parts": 20, "window_hours": 2}
        params["retrain"] |= {"min_new_normals": 30}
        (checkout / "params.yaml").write_text(yaml.safe_dump(params))

        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_HOME: env["PREFECT_HOME"]}):
            # 1. both categories trained, gated and promoted
            first = retrain(root=str(checkout))
            assert first["decisions"] == {"tiles": "promote", "widget": "promote"}, first
            mlflow = MlflowClient()
            production = {c: mlflow.get_model_version_by_alias(f"urd-demo-{c}", "production").version for c in ("tiles", "widget")}
            assert production == {"tiles": "1", "widget": "1"}

            # 2. the line: the service on @production, and respond waiting for its trigger
            service, service_log = procs.start("serve", [sys.executable, "-m", "urd", "serve", "--params", "params.yaml"], checkout)
            url = f"http://127.0.0.1:{serve_port}"
            _wait("the service", lambda: _ready(url), 180, [service_log])
            respond_code = ("import sys; from pipeline.loop import respond, respond_trigger; "
                            "respond.serve(name='served', triggers=[respond_trigger(sys.argv[1])], parameters={'root': sys.argv[1]})")
            responder, responder_log = procs.start("respond", [sys.executable, "-c", respond_code, str(checkout)], checkout)
            with get_client(sync_client=True) as client:
                _wait("the respond deployment", lambda: _deployment(client, "respond/served"), 120, [responder_log])
            demo = checkout / "data/raw/demo"
            posted: list[str] = []

            def post(category: str, files: list[Path], gain: float = 1.0) -> list[dict]:
                out = []
                for f in files:
                    r = httpx.post(f"{url}/v1/inspect/{category}", content=_png(f, gain), params={"camera": "cam1", "part_id": f"{f.stem}-{gain}"},
                                   headers=auth("line"), timeout=60)
                    assert r.status_code == 200, r.text
                    out.append(r.json())
                    posted.append(out[-1]["id"])
                return out

            post("widget", sorted((demo / "widget/test/good").glob("*.png"))[:30])
            post("tiles", sorted((demo / "tiles/test/good").glob("*.png"))[:10])
            bright = post("tiles", sorted((demo / "tiles/train/good").glob("*.png"))[:40], gain=1.4)

            # 3. one drift event, for tiles' camera, answered by respond asking for reviews
            result = monitor(root=str(checkout))
            assert result["alarms"] == ["urd.drift.detected"] and result["categories"]["widget"] == ["cam1: stable"], result
            events = _wait("the drift event", lambda: _events(api), 30, [])
            assert [e["resource"]["prefect.resource.id"] for e in events] == ["urd.camera.tiles.cam1"]
            with get_client(sync_client=True) as client:
                runs = _wait("respond to the drift", lambda: _finished(client, "respond", 1), 300, [responder_log])
            assert runs[0].state.is_completed() and runs[0].parameters["category"] == "tiles", responder_log.read_text()[-3000:]
            ledger = Ledger(f"sqlite:///{checkout / 'ledger.db'}")
            assert [e.event for e in ledger.events("tiles") if e.event.startswith("drift")] == ["drift", "drift_waiting"]
            assert ledger.latest_threshold("tiles", bright[0]["model"]["bundle_digest"]).source == "drift"  # review band widened

            # 4. reviewers confirm the bright parts; the monitor says so; respond harvests and retrains tiles alone
            for record in bright:
                r = httpx.post(f"{url}/v1/inspections/{record['id']}/verdict", json={"verdict": "good"}, headers=auth("reviewer"), timeout=30)
                assert r.status_code == 200, r.text
            assert monitor(root=str(checkout))["alarms"] == ["urd.drift.reviewed"]
            with get_client(sync_client=True) as client:
                runs = _wait("the retrain of tiles", lambda: _finished(client, "respond", 2), 900, [responder_log])
            assert all(r.state.is_completed() for r in runs), responder_log.read_text()[-4000:]
            assert mlflow.get_model_version_by_alias("urd-demo-tiles", "production").version == "2"
            assert mlflow.get_model_version_by_alias("urd-demo-widget", "production").version == "1"
            assert [v.version for v in mlflow.search_model_versions("name='urd-demo-widget'")] == ["1"]  # widget not even rebuilt
            [harvest] = ledger.harvests()
            assert (harvest.category, harvest.good, harvest.defect) == ("tiles", 40, 0)

            # 5. the service hot-swaps to v2 (its challenge set passed) and the new model's flag rate holds on the bright line
            models = _wait("the service on tiles v2", lambda: _serving(url, "tiles", "2"), 120, [service_log])
            assert models["tiles"]["model"]["challenge"]["passed"] and models["widget"]["model"]["model_version"] == "1"
            post("tiles", sorted((demo / "tiles/test/good").glob("*.png"))[10:40], gain=1.4)
            bundle = download_version("urd-demo-tiles", "2", checkout / ".serve-cache" / "monitor")
            p = load_params(checkout / "params.yaml")
            [camera] = monitor_category(ledger, ImageStore(checkout / "ledger-images", 90), "tiles", bundle,
                                        json.loads((bundle / "metadata.json").read_text()), hours_ago(2), alpha_per_run(p, 2), min_parts=20)
            flag = camera.assessment.evidence["flag_rate"]
            assert camera.parts == 30 and flag["p_value"] >= camera.assessment.alpha_per_test, camera.assessment.evidence

            # 6. the record is whole and the checkout clean
            with ledger.session() as session:
                recorded = {i.id for i in session.query(Inspection)}
                taken = {r.inspection_id for r in session.query(HarvestedRecord)}
                assert session.query(Harvest).count() == 1
            assert recorded == set(posted) and taken == {b["id"] for b in bright}
            status = subprocess.run([str(BIN / "dvc"), "status"], cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
            assert status.returncode == 0 and "changed" not in status.stdout and "modified" not in status.stdout, status.stdout
            ledger.engine.dispose()
    finally:
        procs.close()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _deployment(client, name: str):
    try:
        return client.read_deployment_by_name(name)
    except Exception:
        return None


def _finished(client, flow: str, count: int):
    runs = [r for r in client.read_flow_runs() if _flow_name(client, r.flow_id) == flow]
    done = [r for r in runs if r.state and r.state.is_final()]
    return sorted(done, key=lambda r: r.start_time) if len(done) >= count else None


def _serving(url: str, category: str, version: str):
    models = httpx.get(f"{url}/v1/models", headers=auth("line"), timeout=10).json()
    model = models.get(category, {}).get("model")
    return models if model and model["model_version"] == version else None
