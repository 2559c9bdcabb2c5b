"""The promotion gate and rollback (pipeline/promotion.py) on a real MLflow registry (SQLite) with
real bundles: decisions, records, the lock under two concurrent gates, rollback, bad data."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.promotion import PRODUCTION, PromotionError, data_tags, judge, promote, rollback
from urd.cli import app
from urd.config import PromoteParams, parse_params
from urd.data.manifest import build_manifest, write_manifest
from urd.export import export_bundle

from .layouts_fixtures import tiny_widget_project

MODEL = "urd-demo-widget"
REPO = Path(__file__).resolve().parents[1]


def test_judge_floors_then_regression_against_production():
    rules = PromoteParams(min_image_auroc=0.8, min_pixel_auroc=0.9, min_aupro=0.5, max_regression=0.02)
    good = {"image_auroc": 0.95, "pixel_auroc": 0.97, "pixel_aupro": 0.8}
    assert judge(good, None, rules)[0] == "promote" and "no production" in judge(good, None, rules)[1]
    decision, reason = judge(good | {"pixel_auroc": 0.85}, None, rules)
    assert decision == "reject" and "pixel_auroc 0.8500 is below the floor 0.9000 (promote.min_pixel_auroc)" in reason
    # within the margin of production: promote; beyond it: reject, naming the metric and both values
    assert judge(good | {"image_auroc": 0.94}, good | {"image_auroc": 0.955}, rules, "3")[0] == "promote"
    decision, reason = judge(good | {"pixel_aupro": 0.75}, good, rules, "3")
    assert decision == "reject" and "pixel_aupro 0.7500 is 0.0500 below production v3 (0.8000)" in reason
    # data without masks is gated on image AUROC only; an image AUROC that could not be computed never passes
    assert judge({"image_auroc": 0.9, "pixel_auroc": math.nan, "pixel_aupro": math.nan}, None, rules)[0] == "promote"
    assert judge({"image_auroc": math.nan, "pixel_auroc": 0.99, "pixel_aupro": 0.9}, None, rules)[0] == "reject"


def test_judge_compares_operating_points_on_the_field_set_when_there_is_one():
    rules = PromoteParams(min_image_auroc=0.8, min_pixel_auroc=0.0, min_aupro=0.0, max_escape_increase=0.0, max_false_reject_increase=0.02)
    base = {"image_auroc": 0.95, "pixel_auroc": 0.97, "pixel_aupro": 0.8}
    old = base | {"field_escape_rate": 0.10, "field_false_reject_rate": 0.01}
    assert judge(base | {"field_escape_rate": 0.10, "field_false_reject_rate": 0.03}, old, rules, "3")[0] == "promote"
    decision, reason = judge(base | {"field_escape_rate": 0.15, "field_false_reject_rate": 0.0}, old, rules, "3")
    assert decision == "reject" and "field_escape_rate 0.1500 is 0.0500 above production v3 (0.1000)" in reason and "max_escape_increase" in reason
    decision, reason = judge(base | {"field_escape_rate": 0.0, "field_false_reject_rate": 0.05}, old, rules, "3")
    assert decision == "reject" and "field_false_reject_rate" in reason
    # no field set on one side (nan) or no production: nothing to compare
    assert judge(base | {"field_escape_rate": 0.9}, base, rules, "3")[0] == "promote" and judge(base | {"field_escape_rate": 0.9}, None, rules)[0] == "promote"


def test_operating_point_counts_rejected_goods_and_unreviewed_defects_at_the_models_thresholds():
    from pipeline.promotion import operating_point

    point = operating_point([0.1, 0.5, 0.9, 0.2, 0.6, 0.95], [0, 0, 0, 1, 1, 1], {"image_threshold": 0.9, "review_threshold": 0.5})
    assert point == {"field_false_reject_rate": pytest.approx(1 / 3), "field_escape_rate": pytest.approx(1 / 3)}
    # a calibration without a band: the review threshold is the image threshold
    assert operating_point([0.2, 0.6], [1, 1], {"image_threshold": 0.9})["field_escape_rate"] == 1.0


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A factory checkout (validated manifest, validation summary, params) and a registry holding
    three versions of one tiny widget bundle, each tagged as the package stage tags it."""
    import mlflow

    from pipeline import tracking
    from pipeline.registry import register_bundle

    tmp = tmp_path_factory.mktemp("gate")
    runner = CliRunner()
    tiny_widget_project(tmp)
    p, model = str(tmp / "params.yaml"), str(tmp / "model")
    for args in (["train", "--category", "widget", "--out", model], ["calibrate", "--model", model]):
        result = runner.invoke(app, [*args, "--params", p])
        assert result.exit_code == 0, result.output
    export_bundle(tmp / "model", tmp / "bundle", formats=["onnx"], metrics={"overall": {}}, lineage={})

    root = tmp / "factory"
    (root / "reports/validation/widget").mkdir(parents=True)
    (root / "reports/validation/widget/summary.json").write_text(json.dumps({"category": "widget", "success": True, "failures": []}))
    write_manifest(build_manifest("demo", tmp / "demo", "widget", 0.25), root / "data/validated/widget.csv")
    (root / "dvc.yaml").write_text("stages: {}\n")
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["promote"] = {"min_image_auroc": 0.0, "min_pixel_auroc": 0.0, "min_aupro": 0.0, "max_regression": 0.01}
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        tracking.configure(root)
        for _ in range(3):
            with mlflow.start_run(experiment_id=tracking.experiment_id("urd-demo", root)):
                register_bundle(tmp / "bundle", "demo", "widget", data_tags(root, "widget"))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    return root


@pytest.fixture()
def factory(template, tmp_path, monkeypatch):
    """A fresh copy of the checkout and its registry (candidate = v3, no production yet)."""
    root = tmp_path / "factory"
    shutil.copytree(template, root, ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(root)
    return root


def _params(root: Path, **promote):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["promote"] |= promote
    return parse_params(raw)


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _production() -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(MODEL, PRODUCTION).version)
    except MlflowException:
        return None


def test_first_candidate_is_gated_on_floors_only_and_the_decision_is_recorded(factory):
    decision = promote(_params(factory), "widget", factory, version="1")
    assert decision.decision == "promote" and decision.production_version is None and "floors only" in decision.reason
    assert decision.test_images == 9 and 0 <= decision.candidate_metrics["image_auroc"] <= 1
    assert _production() == "1"
    tags = _client().get_model_version(MODEL, "1").tags
    assert tags["promotion.decision"] == "promote" and tags["promotion.previous_production"] == "none"
    assert tags["promotion.candidate.image_auroc"] == f"{decision.candidate_metrics['image_auroc']:.4f}"
    assert tags["promotion.gate_run"] == decision.gate_run_id and tags["promotion.lock"].startswith("file lock")
    run = _client().get_run(decision.gate_run_id)
    assert _client().get_experiment(run.info.experiment_id).name == "promotion"
    assert run.data.tags["decision"] == "promote" and run.data.params["candidate_version"] == "1"
    # the same version again: nothing to do, nothing recorded
    assert promote(_params(factory), "widget", factory, version="1").decision == "noop"

    # v2 scored against production on the same images: identical bundles, so within the margin
    second = promote(_params(factory), "widget", factory, version="2")
    assert second.decision == "promote" and second.production_version == "1"
    assert second.production_metrics == second.candidate_metrics
    assert _client().get_model_version(MODEL, "2").tags["promotion.previous_production"] == "1" and _production() == "2"


def test_a_floor_override_for_the_category_rejects_and_production_stays(factory):
    promote(_params(factory), "widget", factory, version="1")
    raw = yaml.safe_load((factory / "params.yaml").read_text())
    raw["overrides"] = {"widget": {"promote": {"min_image_auroc": 1.5}}}
    decision = promote(parse_params(raw), "widget", factory)  # @candidate = v3
    assert decision.candidate_version == "3" and decision.decision == "reject" and "below the floor 1.5000" in decision.reason
    assert _production() == "1"
    tags = _client().get_model_version(MODEL, "3").tags
    assert tags["promotion.decision"] == "reject" and "promote.min_image_auroc" in tags["promotion.reason"]
    assert tags["promotion.production.image_auroc"]  # production's score on the same images is recorded too


def test_dry_run_decides_but_records_and_moves_nothing(factory):
    decision = promote(_params(factory), "widget", factory, dry_run=True)
    assert decision.decision == "promote" and decision.dry_run and not decision.gate_run_id
    assert _production() is None and not any(k.startswith("promotion.") for k in _client().get_model_version(MODEL, "3").tags)


def test_data_that_failed_validation_is_never_promoted(factory):
    summary = factory / "reports/validation/widget/summary.json"
    summary.write_text(json.dumps({"success": False, "failures": [
        {"rule": "check_decodes", "description": "decodes", "fix": "replace it", "count": 1, "files": ["data/raw/demo/widget/train/good/007.png"]}]}))
    (factory / "data/validated/widget.csv").unlink()  # the validate stage removes it before it runs
    decision = promote(_params(factory), "widget", factory)
    assert decision.decision == "reject" and "failed validation" in decision.reason and "007.png" in decision.reason
    assert not decision.candidate_metrics and _production() is None
    assert "007.png" in _client().get_model_version(MODEL, "3").tags["promotion.reason"]


def test_a_candidate_trained_on_other_data_is_stale(factory):
    validated = factory / "data/validated/widget.csv"
    validated.write_text(validated.read_text() + "\n")
    decision = promote(_params(factory), "widget", factory)
    assert decision.decision == "reject" and "stale candidate" in decision.reason and _production() is None


def test_two_gates_at_once_are_serialised(factory):
    promote(_params(factory), "widget", factory, version="1")
    env = os.environ | {"PYTHONPATH": str(REPO)}
    gates = [subprocess.Popen([sys.executable, "-m", "pipeline", "promote", "--category", "widget", "--version", v], cwd=factory, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for v in ("2", "3")]
    outputs = [g.communicate(timeout=300)[0] for g in gates]
    assert [g.returncode for g in gates] == [0, 0], outputs
    tags = {v: _client().get_model_version(MODEL, v).tags for v in ("2", "3")}
    assert all(t["promotion.decision"] == "promote" for t in tags.values()), outputs
    first, second = sorted(tags, key=lambda v: tags[v]["promotion.started"])
    # one decision order explains everything: the second gate saw the first one's result
    assert tags[first]["promotion.previous_production"] == "1"
    assert tags[second]["promotion.previous_production"] == first
    assert tags[first]["promotion.time"] <= tags[second]["promotion.started"]
    assert _production() == second


def test_rollback_restores_the_previous_production_and_refuses_the_rolled_back_version(factory, capsys):
    from pipeline.cli import main

    for version in ("1", "2"):
        promote(_params(factory), "widget", factory, version=version)
    _client().set_registered_model_alias(MODEL, "candidate", "2")
    assert main(["rollback", "--category", "widget"]) == 0
    assert "production moved back from v2 to v1" in capsys.readouterr().out
    assert _production() == "1"
    tags = _client().get_model_version(MODEL, "2").tags
    assert tags["promotion.rolled_back"] and _client().get_run(tags["promotion.rolled_back_run"]).data.tags["decision"] == "rollback"
    # the registry tells the truth: v2 is no longer "promote" and no longer the candidate
    assert tags["promotion.decision"] == "rolled_back" and "rolled back at" in tags["promotion.reason"]
    assert "candidate" not in _client().get_registered_model(MODEL).aliases
    # `python -m pipeline status` says the same, per category, for a person or a script
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=factory, check=True)
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["category"] == "widget")
    assert (row["category"], row["production"], row["candidate"]) == ("widget", "1", None)
    assert row["last_decision"] == "rolled_back" and row["last_decision_version"] == "2" and row["last_registered_version"] == "3"
    assert row["changed_since"] == []
    assert main(["status"]) == 0
    table = capsys.readouterr().out
    assert "widget" in table and "rolled_back v2" in table
    again = promote(_params(factory), "widget", factory, version="2")
    assert again.decision == "reject" and "rolled back" in again.reason and _production() == "1"
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        rollback(_params(factory), "widget", factory)  # v1 replaced nothing
    assert main(["rollback", "--category", "widget"]) == 1 and "nothing to roll back to" in capsys.readouterr().err


def test_the_gate_names_a_missing_candidate_and_refuses_a_shared_store_without_a_prefect_lock(factory, monkeypatch, capsys):
    from pipeline.cli import main

    assert main(["promote", "--category", "widget", "--version", "9"]) == 1
    assert "no version 9" in capsys.readouterr().err
    _client().delete_registered_model_alias(MODEL, "candidate")
    assert main(["promote", "--category", "widget"]) == 1
    assert "has no version with the alias @candidate" in capsys.readouterr().err
    from pipeline.promotion import serialised

    with pytest.raises(PromotionError, match="PREFECT_API_URL"):
        with serialised(MODEL, "http://mlflow.internal:5000"):
            pass


def test_a_recalibration_that_would_let_more_defects_through_is_rejected(factory, template):
    """Two versions with the same weights and other thresholds; with a field set the gate compares
    them where a factory counts: the one that sends every defect to a reviewer is promoted, the one
    that would accept them unreviewed is refused as a recalibration."""
    import cv2
    import mlflow

    from pipeline import tracking
    from pipeline.promotion import file_md5
    from pipeline.registry import register_bundle
    from urd.data.field import LABEL_COLUMNS
    from urd.service.store import sha256

    bundle = template.parent / "bundle"
    # the field set: confirmed defects from the line (mirrored test defects, so not test images), listed by the category folder
    raw = yaml.safe_load((factory / "params.yaml").read_text())
    raw["dataset"]["root"] = str(factory / "line")
    (factory / "params.yaml").write_text(yaml.safe_dump(raw))
    defect_folder = factory / "data/field/demo/widget/defect"
    defect_folder.mkdir(parents=True)
    rows = []
    for path in sorted((template.parent / "demo/widget/test").glob("[!g]*/*.png"))[:4]:
        data = cv2.imencode(".png", cv2.flip(cv2.imread(str(path)), 1))[1].tobytes()
        (defect_folder / f"{sha256(data)}.png").write_bytes(data)
        rows.append({"file": f"{sha256(data)}.png", "verdict": "defect"})
    (factory / "line/widget").mkdir(parents=True)
    with (factory / "line/widget/harvests.csv").open("w", newline="") as handle:
        import csv

        writer = csv.DictWriter(handle, LABEL_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)

    def version_with(thresholds: dict[str, float]) -> str:
        copy = factory.parent / f"bundle-{len(list(factory.parent.glob('bundle-*')))}"
        shutil.copytree(bundle, copy)
        meta = json.loads((copy / "metadata.json").read_text())
        meta["thresholds"] |= thresholds
        (copy / "metadata.json").write_text(json.dumps(meta))
        tracking.configure(factory)
        with mlflow.start_run(experiment_id=tracking.experiment_id("urd-demo", factory)):
            tags = data_tags(factory, "widget") | {"weights_md5": file_md5(template.parent / "model" / "model.safetensors")}
            return str(register_bundle(copy, "demo", "widget", tags).version)

    image_threshold = json.loads((bundle / "metadata.json").read_text())["thresholds"]["image_threshold"]
    careful = version_with({"review_threshold": -1e9})  # every part at least reviewed: no escapes
    first = promote(_params(factory), "widget", factory, version=careful)
    assert first.decision == "promote" and first.candidate_metrics["field_escape_rate"] == 0.0
    assert 0 <= first.candidate_metrics["field_false_reject_rate"] <= 1

    careless = version_with({"review_threshold": image_threshold + 1e6, "image_threshold": image_threshold + 1e6})  # accepts everything
    decision = promote(_params(factory), "widget", factory, version=careless)
    assert decision.recalibration and decision.decision == "reject" and _production() == careful
    assert decision.candidate_metrics["field_escape_rate"] == 1.0 and decision.production_metrics["field_escape_rate"] == 0.0
    assert "field_escape_rate 1.0000 is 1.0000 above production" in decision.reason and "(recalibration: same weights)" in decision.summary()
    tags = _client().get_model_version(MODEL, careless).tags
    assert tags["promotion.recalibration"] == "true" and tags["promotion.candidate.field_escape_rate"] == "1.0000"
