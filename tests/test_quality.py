"""A smaller version of the quality bar, at the embedded default's model (EfficientNet-Lite0 with
the packaged ImageNet weights, expert off, GII, synthetic anomalies for the student) on the demo's
widget, at 64 px and 150 iterations instead of 96 px and 300 (1-2 minutes on 2 CPU cores).

The full bar is measured at the demo defaults by `make demo` and reported in the README. The floors
here are regression guards below what this smaller setting measures on the demo's test split (48
good, 72 defective images), recorded in FLOORS_FROM; image AUROC is asserted on the lower end of its
95% bootstrap interval, not on the point estimate."""

import pytest
import torch

from urd.config import parse_params
from urd.data.demo import DemoSpec, generate_demo
from urd.data.manifest import build_manifest
from urd.evaluate import evaluate_model
from urd.train import train_category

SMALL = {"image_size": 64, "iterations": 150, "blur_sigma": 1.0}  # the paper's sigma 4 at 256 px, scaled
# The random-init resnet18 that was the default before measured 0.748 [0.66, 0.83] / 0.874 here: it fails these.
BAR = {"image_auroc_ci_low": 0.80, "pixel_auroc": 0.93, "pixel_aupro": 0.75}
FLOORS_FROM = "measured 2026-12-01 on a 2-core EPYC: image AUROC 0.947 [0.903, 0.980], pixel AUROC 0.974, AUPRO 0.853"


@pytest.mark.slow
def test_default_model_finds_the_demo_widget_defects(tmp_path):
    generate_demo(tmp_path / "demo", DemoSpec())
    params = parse_params({
        "dataset": {"root": str(tmp_path / "demo"), "categories": ["widget"], "image_size": SMALL["image_size"]},
        "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "expert": False, "gii": "gii", "blur_sigma": SMALL["blur_sigma"]},
        "train": {"iterations": SMALL["iterations"], "batch_size": 8, "checkpoint_every": SMALL["iterations"], "num_workers": 0},
        "synthesis": {"foreground": {"widget": "otsu"}},
    })
    manifest = build_manifest("demo", tmp_path / "demo", "widget", params.dataset.val_fraction)
    torch.manual_seed(0)
    train_category(params, "widget", manifest, tmp_path / "model", progress=False)
    overall = evaluate_model(tmp_path / "model", manifest, tmp_path / "report", progress=False)["overall"]
    print({k: round(overall[k], 4) for k in ("image_auroc", "image_auroc_ci_low", "image_auroc_ci_high", "pixel_auroc", "pixel_aupro")})
    for key, floor in BAR.items():
        assert overall[key] >= floor, (key, overall[key], FLOORS_FROM)
