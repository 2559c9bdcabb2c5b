"""Bundle -> predict parity, model card, MLflow tracking helpers, pyfunc model and registry."""

import json
import shutil

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import tracking
from pipeline.model_card import CARD_JSON, CARD_MD, _caveats, build_card, write_model_card
from urd.cli import app
from urd.config import parse_params
from urd.data.manifest import build_manifest
from urd.export import METADATA_FILE, export_bundle

from .layouts_fixtures import tiny_widget_project

runner = CliRunner()


@pytest.fixture(scope="module")
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
    return tmp


def test_predict_with_the_bundle_reproduces_the_evaluate_scores(packaged):
    test_files = pd.read_csv(packaged / "report" / "scores.csv")
    result = runner.invoke(app, ["predict", *test_files["path"], "--model", str(packaged / "bundle"), "--out", str(packaged / "pred")])
    assert result.exit_code == 0, result.output
    predicted = pd.read_csv(packaged / "pred" / "predictions.csv").set_index("path")
    for path, score in zip(test_files["path"], test_files["score"]):
        assert predicted.loc[path, "score"] == pytest.approx(score, abs=1e-4)
    calibration = json.loads((packaged / "model" / "calibration.json").read_text())
    assert (predicted["is_anomalous"] == (predicted["score"] >= calibration["image_threshold"])).all()


def test_predictor_precision_per_model_kind(packaged, monkeypatch):
    import numpy as np

    import urd.runtime as runtime
    from urd.inference import Predictor

    files = pd.read_csv(packaged / "report" / "scores.csv")["path"].tolist()
    fp32 = Predictor(packaged / "model", precision="fp32")
    bf16 = Predictor(packaged / "model", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    scores32 = np.array([r.score for r in fp32.predict(files)])
    scores16 = np.array([r.score for r in bf16.predict(files)])
    assert not np.array_equal(scores32, scores16)  # bf16 did run
    np.testing.assert_allclose(scores16, scores32, rtol=2e-2)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    assert Predictor(packaged / "model").precision == "fp32"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512_bf16"})
    assert Predictor(packaged / "model").precision == "bf16"
    assert Predictor(packaged / "bundle").precision == "fp32"  # ONNX Runtime runs the fp32 graph unless int8 is asked for
    with pytest.raises(ValueError, match="int8"):
        Predictor(packaged / "model", precision="int8")
    with pytest.raises(ValueError, match="auto, fp32 or int8"):
        Predictor(packaged / "bundle", precision="bf16")
    with pytest.raises(FileNotFoundError, match="package.quantize: int8"):
        Predictor(packaged / "bundle", precision="int8")


def test_thresholds_edited_in_metadata_take_effect(packaged):
    from urd.inference import Predictor

    bundle = packaged / "edited"
    shutil.copytree(packaged / "bundle", bundle)
    meta = json.loads((bundle / METADATA_FILE).read_text())
    files = pd.read_csv(packaged / "report" / "scores.csv")["path"].tolist()[:3]
    meta["thresholds"]["image_threshold"] = -1.0  # everything is anomalous
    (bundle / METADATA_FILE).write_text(json.dumps(meta))
    assert all(r.is_anomalous for r in Predictor(bundle).predict(files))
    meta["thresholds"]["image_threshold"] = 1e9  # nothing is
    (bundle / METADATA_FILE).write_text(json.dumps(meta))
    assert not any(r.is_anomalous for r in Predictor(bundle).predict(files))


def test_model_card_sections_counts_and_warning(packaged):
    manifest = build_manifest("demo", packaged / "demo", "widget", 0.25)
    card_json, card_md = write_model_card(packaged / "bundle", manifest)
    assert card_json.name == CARD_JSON and card_md.name == CARD_MD
    card = json.loads(card_json.read_text())
    for section in ("model_details", "intended_use", "out_of_scope", "training_data", "evaluation_data", "metrics", "thresholds", "caveats", "how_to_use"):
        assert card[section], section
    assert card["model_details"]["name"] == "urd-demo-widget"
    assert card["training_data"]["train_images"] == int((manifest.split == "train").sum())
    assert card["training_data"]["val_images"] == int((manifest.split == "val").sum())
    assert card["training_data"]["dvc_data_md5"] == "123.dir"
    assert card["evaluation_data"]["good"] == 3 and card["evaluation_data"]["defect"] == 6
    assert card["evaluation_data"]["per_defect_type"] == {"contamination": 2, "missing_piece": 2, "scratch": 2}
    metrics = json.loads((packaged / "report" / "metrics.json").read_text())
    at = card["thresholds"]["test_at_image_threshold"]
    assert at == metrics["at_calibrated_threshold"] and card["thresholds"]["test_at_pixel_threshold"]["recall"] >= 0
    assert card["caveats"][0].startswith("WARNING") and "RANDOMLY INITIALISED" in card["caveats"][0]
    # dtd_root is configured (the default) but holds no DTD: the texture fallback is recorded and warned about
    assert card["training_data"]["anomaly_textures"] == "procedural"
    assert any("PROCEDURAL textures" in c and "'data/raw/dtd'" in c for c in card["caveats"])
    n_val = card["training_data"]["val_images"]
    assert any(f"steps of 1/{n_val} = " in c and "Hold out at least 100 normal images" in c for c in card["caveats"])  # target 0.01
    text = card_md.read_text()
    for heading in ("## Model details", "## Intended use", "## Out-of-scope uses", "## Training data", "## Evaluation data",
                    "## Metrics (test split)", "## Calibrated thresholds", "## Caveats", "## How to use"):
        assert heading in text, heading
    assert "> **WARNING" in text and f"recall {at['recall']:.4f}" in text
    for defect in ("scratch", "missing_piece", "contamination"):
        assert f"| {defect} |" in text


def test_model_card_without_warning_for_pretrained_weights_and_dtd_textures(packaged):
    meta = json.loads((packaged / "bundle" / METADATA_FILE).read_text()) | {"weights_source": "imagenet", "dataset": "mvtec"}
    meta["training"] = meta["training"] | {"texture_source": "dtd:/data/dtd", "dtd_root": "/data/dtd"}
    card = build_card(meta, build_manifest("demo", packaged / "demo", "widget", 0.25))
    assert not any(c.startswith("WARNING") for c in card["caveats"]) and card["model_details"]["name"] == "urd-mvtec-widget"


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


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return tmp_path


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
    assert list(out.columns[:3]) == ["score", "normalized_score", "is_anomalous"]
    for row, ref in zip(out.itertuples(), expected):
        assert row.score == pytest.approx(ref.score, abs=1e-6) and row.is_anomalous == ref.is_anomalous
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


def test_threshold_resolution_caveat_only_when_the_val_split_cannot_resolve_the_target():
    counts = {"test": {"good": 50, "defect": 50}, "val": 40}
    def caveats(target, method="val_quantile"):
        return [c for c in _caveats({}, counts, {"method": method, "target_fpr": target, "val_images": 40}) if "resolve rates" in c]
    assert len(caveats(0.01)) == 1 and "1/40 = 0.025" in caveats(0.01)[0]
    assert caveats(0.05) == [] and caveats(0.01, method="f1_calibration_set") == []


def test_int8_bundle_records_its_parity_and_the_card_shows_it(packaged, tmp_path):
    from urd.export import add_int8_graph
    from urd.inference import Predictor

    bundle = tmp_path / "bundle"
    shutil.copytree(packaged / "bundle", bundle)
    manifest = build_manifest("demo", packaged / "demo", "widget", 0.25)
    add_int8_graph(bundle, manifest, 64)
    meta = json.loads((bundle / METADATA_FILE).read_text())
    q = meta["int8"]
    assert meta["files"]["onnx_int8"] == "model.int8.onnx" and (bundle / "model.int8.onnx").is_file()
    assert q["calibration_split"] == "val" and q["calibration_images"] == int((manifest.split == "val").sum())
    parity = q["parity_on_test"]
    assert parity["images"] == 9 and -1 <= parity["image_score_spearman"] <= 1
    # the fp32 figure is the bundle's own: it equals the AUROC of the fp32 graph's scores on the same images
    from sklearn.metrics import roc_auc_score

    test = manifest[manifest.split == "test"].reset_index(drop=True)
    _, scores, _ = Predictor(bundle).score_rows(test)
    assert parity["fp32_image_auroc"] == pytest.approx(roc_auc_score(test["label"], scores))
    _, card_md = write_model_card(bundle, manifest)
    assert "int8 graph `model.int8.onnx` (calibrated on" in card_md.read_text() and "image-score Spearman" in card_md.read_text()


def test_model_card_names_the_variant_that_was_trained(packaged):
    meta = json.loads((packaged / "bundle" / METADATA_FILE).read_text())
    manifest = build_manifest("demo", packaged / "demo", "widget", 0.25)
    full = build_card(meta | {"architecture": meta["architecture"] | {"expert_in_training": True, "gii": "gii"}}, manifest)
    assert "Expert-Teacher-Student" in full["model_details"]["method"] and "Guided Information Injection" in full["model_details"]["method"]
    off = build_card(meta | {"architecture": meta["architecture"] | {"expert_in_training": False, "gii": "none"}}, manifest)
    assert "expert off" in off["model_details"]["method"] and "plain RD decoder" in off["model_details"]["method"]


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
