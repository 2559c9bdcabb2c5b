"""A smaller version of the quality bar: the full method (RD-E + GII) learns to find the demo's
defects with a random backbone on CPU. The full bar (image AUROC >= 0.85, pixel AUROC >= 0.90 at
the demo defaults) is measured by bench/ablation.py; this runs in about 3 minutes."""

import pytest
import torch

from urd.config import parse_params
from urd.data.demo import DemoSpec, generate_demo
from urd.data.manifest import build_manifest
from urd.evaluate import evaluate_model
from urd.train import train_category

SMALL = {"image_size": 64, "iterations": 200}
BAR = {"image_auroc": 0.75, "pixel_auroc": 0.88}


@pytest.mark.slow
def test_full_method_beats_chance_clearly_on_the_demo_widget(tmp_path):
    generate_demo(tmp_path / "demo", DemoSpec())
    params = parse_params({
        "dataset": {"root": str(tmp_path / "demo"), "categories": ["widget"], "image_size": SMALL["image_size"]},
        "model": {"expert": True, "gii": "gii", "weights": "none"},
        "train": {"iterations": SMALL["iterations"], "batch_size": 8, "checkpoint_every": SMALL["iterations"], "num_workers": 0},
        "synthesis": {"foreground": {"widget": "otsu"}},
    })
    manifest = build_manifest("demo", tmp_path / "demo", "widget", params.dataset.val_fraction)
    torch.manual_seed(0)
    train_category(params, "widget", manifest, tmp_path / "model", progress=False)
    overall = evaluate_model(tmp_path / "model", manifest, tmp_path / "report", progress=False)["overall"]
    print({k: round(overall[k], 4) for k in ("image_auroc", "pixel_auroc", "pixel_aupro")})
    for key, floor in BAR.items():
        assert overall[key] >= floor, (key, overall[key])
