"""The registered bundle served by `mlflow models serve`: the predict scores over HTTP, 4xx on bad requests."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline import tracking
from urd.config import parse_params


runner = CliRunner()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_mlflow_models_serve_gives_the_predict_scores_and_4xx_on_bad_requests(packaged, mlflow_store):
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from pipeline.registry import register_bundle, request_body
    from urd.inference import Predictor

    params = parse_params({"dataset": {"root": str(packaged / "demo"), "image_size": 64}})
    run_file = mlflow_store / "mlflow_run.json"
    tracking.start_category_run(params, "widget", run_file)
    with tracking.category_run(run_file):
        register_bundle(packaged / "bundle", "demo", "widget", {})
    port = _free_port()
    # As from an activated venv: the server runs `uvicorn` from PATH.
    env = os.environ | {"PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/urd-demo-widget@candidate", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
            assert server.poll() is None, server.stdout.read().decode()
        files = pd.read_csv(packaged / "report" / "scores.csv")["path"].tolist()[:3]
        status, text = _post(f"{base}/invocations", json.dumps(request_body([open(f, "rb").read() for f in files])).encode())
        assert status == 200, text
        served = json.loads(text)["predictions"]
        expected = Predictor(packaged / "bundle").predict(files)
        assert [round(p["score"], 5) for p in served] == [round(r.score, 5) for r in expected]
        assert [p["is_anomalous"] for p in served] == [r.is_anomalous for r in expected]

        status, text = _post(f"{base}/invocations", json.dumps(request_body([b"this is not a png"])).encode())
        assert 400 <= status < 500 and "could not be decoded" in text, (status, text)
        status, text = _post(f"{base}/invocations", b'{"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}')
        assert 400 <= status < 500 and "image" in text, (status, text)
        status, text = _post(f"{base}/invocations", b"{not json")
        assert 400 <= status < 500, (status, text)
    finally:
        server.terminate()
        server.wait(timeout=30)
