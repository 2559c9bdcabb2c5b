"""A bundle and a model folder predict what evaluate scored: precision per model kind, thresholds edited in metadata, the int8 graph."""

import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.model_card import write_model_card
from urd.cli import app
from urd.data.manifest import build_manifest
from urd.files import METADATA_FILE


runner = CliRunner()


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
