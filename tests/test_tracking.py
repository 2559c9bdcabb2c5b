"""MLflow tracking of the pipeline: URI, params, lineage tags, one run shared by the stages."""

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import tracking
from urd.config import parse_params


runner = CliRunner()


def test_tracking_uri_defaults_to_sqlite_at_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri() == "http://mlflow.example:5000"


def test_flatten_params():
    flat = tracking.flatten({"train": {"lr": 0.1, "betas": [0.5, 0.9]}, "seed": 0, "x": {"y": {"z": None}}})
    assert flat == {"train.lr": "0.1", "train.betas": "[0.5, 0.9]", "seed": "0", "x.y.z": "null"}


def test_lineage_reads_dvc_hashes_from_the_lock_file(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    lock = {"schema": "2.0", "stages": {"ingest@widget": {
        "deps": [{"path": "data/raw/demo/widget", "md5": "abc.dir"}, {"path": "urd/data/layouts.py", "md5": "x"}],
        "outs": [{"path": "data/manifests/widget.csv", "md5": "def"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    tags = tracking.lineage_tags(parse_params({}), "widget", tmp_path)
    assert tags["dvc_data_md5"] == "abc.dir" and tags["dvc_manifest_md5"] == "def"
    assert tags["dataset"] == "demo" and tags["weights_source"] == "imagenet" and tags["git_commit"] == "unknown"
    assert tracking.lineage_tags(parse_params({}), "tiles", tmp_path)["dvc_data_md5"] == "unknown"


def test_runs_are_shared_across_stages_and_the_bundle_is_registered(packaged, mlflow_store):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.registry import register_bundle
    from urd.inference import Predictor

    params = parse_params({"dataset": {"root": str(packaged / "demo"), "image_size": 64}})
    run_file = mlflow_store / "models" / "widget" / "mlflow_run.json"
    run_id = tracking.start_category_run(params, "widget", run_file)
    assert tracking.start_category_run(params, "widget", run_file, resume=True) == run_id  # a resumed training keeps its run
    with tracking.category_run(run_file) as run:
        assert run.info.run_id == run_id
        tracking.log_evaluation(json.loads((packaged / "report" / "metrics.json").read_text()))
        version = register_bundle(packaged / "bundle", "demo", "widget", {"git_commit": "abc", "test_image_auroc": "0.5"})
    client = MlflowClient()
    logged = client.get_run(run_id)
    assert logged.data.params["train.iterations"] == str(params.train.iterations) and logged.data.tags["dataset"] == "demo"
    assert "test_image_auroc" in logged.data.metrics and "test/scratch/image_auroc" in logged.data.metrics
    assert client.get_experiment(logged.info.experiment_id).name == "urd-demo"
    assert version.name == "urd-demo-widget" and version.tags["git_commit"] == "abc"
    assert client.get_model_version_by_alias("urd-demo-widget", "candidate").version == version.version

    model = mlflow.pyfunc.load_model("models:/urd-demo-widget@candidate")
    files = pd.read_csv(packaged / "report" / "scores.csv")["path"].tolist()[:4]
    out = model.predict(pd.DataFrame({"image": [open(f, "rb").read() for f in files]}))
    expected = Predictor(packaged / "bundle").predict(files)
    assert list(out.columns[:4]) == ["score", "normalized_score", "is_anomalous", "decision"]
    for row, ref in zip(out.itertuples(), expected):
        assert row.score == pytest.approx(ref.score, abs=1e-6) and row.is_anomalous == ref.is_anomalous
        assert row.decision == ref.decision
    with_maps = model.predict(pd.DataFrame({"image": [open(files[0], "rb").read()]}), params={"return_anomaly_map": True})
    assert len(with_maps["anomaly_map"][0]) == 64 and len(with_maps["anomaly_map"][0][0]) == 64
    with pytest.raises(MlflowException, match="row 1"):
        model.predict(pd.DataFrame({"image": [open(files[0], "rb").read(), b"not an image"]}))

    with tracking.category_run(run_file):
        again = register_bundle(packaged / "bundle", "demo", "widget", {})
    assert int(again.version) == int(version.version) + 1
    assert client.get_model_version_by_alias("urd-demo-widget", "candidate").version == again.version


def test_category_run_without_the_train_stage_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train stage"):
        with tracking.category_run(tmp_path / "mlflow_run.json"):
            pass


def test_experiment_created_by_another_process_in_between_is_reused(tmp_path, monkeypatch):
    """Two fan-out children on one MLflow server both find no experiment and both create it: the
    loser of that race must read the winner's, not fail its training stage."""
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    winner = MlflowClient().create_experiment("urd-demo")
    real = MlflowClient.get_experiment_by_name
    calls = []

    def first_sees_nothing(self, name):
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", first_sees_nothing)
    assert tracking.experiment_id("urd-demo", tmp_path) == winner and len(calls) == 2
    monkeypatch.setattr(MlflowClient, "create_experiment", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):  # anything but "already exists" still fails
        tracking.experiment_id("urd-other", tmp_path)
