"""A smaller version of the demo quality bar (README "Measurements"): train the full method on one
demo category at reduced settings and check it clearly beats chance on the test split."""

import pytest

from urd.config import load_params
from urd.data.manifest import ingest_category
from urd.evaluate import evaluate_model
from urd.train import train_category


@pytest.mark.slow
def test_urd_beats_chance_on_the_demo(tmp_path):
    base = load_params("params.yaml")
    train = base.train.model_copy(update={"iterations": 120, "checkpoint_every": 120, "num_workers": 0})
    dataset = base.dataset.model_copy(update={"root": str(tmp_path / "demo")})
    params = base.model_copy(update={"train": train, "dataset": dataset})
    manifest = ingest_category(params, "widget", progress=False)
    train_category(params, "widget", manifest, tmp_path / "model", progress=False)
    overall = evaluate_model(tmp_path / "model", manifest, tmp_path / "report", progress=False)["overall"]
    assert overall["image_auroc"] >= 0.7, overall
    assert overall["pixel_auroc"] >= 0.85, overall
