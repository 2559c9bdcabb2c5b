"""params/paper.yaml: the authors' release's training, one argument away, and it runs end to end."""

import json
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from urd.cli import app
from urd.config import load_params

from .layouts_fixtures import make_mvtec

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "params" / "paper.yaml"


def test_the_profile_sets_every_release_switch():
    p = load_params(PROFILE)
    assert (p.dataset.name, p.dataset.image_size, p.model.backbone, p.model.weights) == ("mvtec", 256, "wide_resnet50_2", "imagenet")
    assert (p.train.batch_size, p.train.iterations, p.train.precision) == (16, 5000, "fp32")
    assert p.for_category("cable").train.iterations == p.for_category("transistor").train.iterations == 10000
    assert p.model.expert and p.model.teacher_batchnorm == "train" and p.model.teacher_synthetic_term
    assert (p.model.teacher_mask, p.model.gii, p.model.blur_sigma, p.model.blur_border) == ("cascade", "skip", 4, "reflect")
    assert (p.train.student_passes, p.train.incomplete_batches) == ("separate", "keep")
    assert (p.synthesis.beta_range, p.synthesis.redraw_empty_masks, p.synthesis.texture_flips) == ((0.2, 1.0), False, False)
    assert len(p.dataset.categories) == 15


def test_urd_run_with_the_profile_at_a_tiny_size(tmp_path):
    """Every release switch on, only what a CPU test cannot afford shrunk (size, backbone, iterations)."""
    raw = yaml.safe_load(PROFILE.read_text())
    make_mvtec(tmp_path / "mvtec", "bottle", n_train=11)  # 9 train images in batches of 4: an incomplete batch each epoch
    raw["dataset"] |= {"root": str(tmp_path / "mvtec"), "categories": ["bottle"], "image_size": 64, "min_train_images": 2}
    raw["model"] |= {"backbone": "resnet18", "weights": "none", "blur_sigma": 1}
    raw["train"] |= {"iterations": 4, "batch_size": 4, "checkpoint_every": 2, "num_workers": 0}
    raw["synthesis"]["dtd_root"] = str(tmp_path / "no-dtd")
    raw["overrides"] = {}
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", "--params", str(tmp_path / "paper.yaml"), "--models", str(tmp_path / "models"),
                                      "--reports", str(tmp_path / "reports")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "models" / "bottle" / "model.json").read_text())
    assert meta["architecture"]["blur_border"] == "reflect" and meta["architecture"]["gii"] == "skip"
    assert meta["architecture"]["expert_in_training"] is True
    assert json.loads((tmp_path / "reports" / "bottle" / "metrics.json").read_text())["overall"]["image_auroc"] >= 0


def test_the_profiles_step_is_the_releases_step():
    """urd's training step with the profile's switches against the release's equations written out
    independently (tests/release_step.py), and against the reference stored from them once."""
    from urd.config import TrainParams
    from urd.train import make_optimizers, train_step

    from .release_step import REFERENCE, fingerprint, fixed_setup, release_step

    p = load_params(PROFILE)
    model, normal, anomalous, mask = fixed_setup()
    reference = release_step(model, normal, anomalous, mask)
    stored = json.loads(REFERENCE.read_text())
    assert fingerprint(reference)["grads"].keys() == stored["grads"].keys()
    for key, (total, norm) in fingerprint(reference)["grads"].items():
        assert abs(total - stored["grads"][key][0]) <= 1e-6 * max(1.0, abs(norm)) and abs(norm - stored["grads"][key][1]) <= 1e-6 * max(1.0, norm), key

    ours, normal, anomalous, mask = fixed_setup()
    losses = train_step(ours, make_optimizers(ours, TrainParams()), normal, anomalous, mask, p.model.teacher_synthetic_term,
                        teacher_mask=p.model.teacher_mask, student_passes=p.train.student_passes)
    assert abs(losses["teacher"] - stored["teacher_loss"]) <= 1e-6 and abs(losses["student"] - stored["student_loss"]) <= 1e-6
    grads = {f"teacher.{k}": q.grad for k, q in ours.teacher.named_parameters()} | {f"student.{k}": q.grad for k, q in ours.student.named_parameters()}
    for key, g in grads.items():
        want = reference["grads"][key]
        assert torch.allclose(g, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()) + 1e-12), (key, float((g - want).abs().max()))
    # The BatchNorm statistics after the step too (the teacher's moved in train mode, the student's twice)
    for (k, a), (_, b) in zip(ours.state_dict().items(), model.state_dict().items()):
        if "running" in k:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), k
    # And the joint student pass or direct masks are a different step: the test can tell them apart.
    other, normal, anomalous, mask = fixed_setup()
    joint = train_step(other, make_optimizers(other, TrainParams()), normal, anomalous, mask, True, teacher_mask="direct")
    assert abs(joint["teacher"] - stored["teacher_loss"]) > 1e-6 or abs(joint["student"] - stored["student_loss"]) > 1e-6
