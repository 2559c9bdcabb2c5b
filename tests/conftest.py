import json
import os

import pytest
import torch
from typer.testing import CliRunner

from urd.cli import app
from urd.challenge import write_challenge_set
from urd.data.manifest import read_manifest
from urd.drift import write_reference
from urd.export import export_bundle

from .layouts_fixtures import tiny_widget_project

runner = CliRunner()


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    # A fixed thread count: with the automatic budget another urd job on this host (a slow test,
    # a training) would change it mid-test, and results are bit-identical only at one count.
    monkeypatch.setenv("URD_THREADS", "2")
    yield


# A tiny trained, calibrated, evaluated and exported widget model, shared by the tests of the
# bundle, the model card, tracking and the registry.
@pytest.fixture(scope="session")
def packaged(tmp_path_factory):
    """A tiny trained, calibrated, evaluated and exported widget model."""
    tmp = tmp_path_factory.mktemp("packaging")
    tiny_widget_project(tmp)
    p, model = str(tmp / "params.yaml"), str(tmp / "model")
    for args in (["train", "--category", "widget", "--out", model], ["calibrate", "--model", model], ["evaluate", "--model", model, "--out", str(tmp / "report")]):
        result = runner.invoke(app, [*args, "--params", p])
        assert result.exit_code == 0, result.output
    metrics = json.loads((tmp / "report" / "metrics.json").read_text())
    export_bundle(tmp / "model", tmp / "bundle", metrics=metrics, lineage={"git_commit": "abc", "dvc_data_md5": "123.dir"})
    write_challenge_set(tmp / "bundle", read_manifest(tmp / "model" / "manifest.csv"))
    write_reference(tmp / "bundle", read_manifest(tmp / "model" / "manifest.csv"))
    return tmp


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def isolated_mlflow_uris():
    """Flows run in-process point MLflow's process-wide tracking and registry URIs (and the
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI variables they set) at their own store; afterwards
    both go back, so a later test's client reads its own environment, not a stopped server."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
