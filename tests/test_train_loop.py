import json

import pytest
import torch
from safetensors.torch import load_file

from urd.checkpoint import load_model
from urd.config import parse_params
from urd.data.demo import DemoSpec, generate_demo
from urd.data.manifest import build_manifest
from urd.scoring import score_images
from urd.train import FrozenFeatureCache, train_category


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, DemoSpec(size=64, train=8, test_good=2, test_per_defect=1))
    params = parse_params({
        "dataset": {"root": str(root), "image_size": 64, "val_fraction": 0.25},
        # the expert on: the teacher's optimiser and BatchNorm are part of what a resume restores
        "model": {"backbone": "resnet18", "weights": "none", "expert": True, "teacher_batchnorm": "train"},
        "train": {"iterations": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "num_workers": 0},
        "synthesis": {"foreground": {"widget": "otsu"}},
    })
    manifest = build_manifest("demo", root, "widget", 0.25, progress=False)
    return params, manifest


def test_resumed_run_ends_bit_identical_to_uninterrupted(tiny, tmp_path):
    params, manifest = tiny
    seen = []

    def look(iteration, model):  # a study hook that runs the model must not change the run
        score_images(model.inference_graph(), manifest[manifest.split == "val"], 64, torch.device("cpu"))
        seen.append(iteration)

    full = train_category(params, "widget", manifest, tmp_path / "full", progress=False, on_checkpoint=look)
    assert seen == [2, 4]
    partial = train_category(params, "widget", manifest, tmp_path / "resumed", progress=False, stop_after=2)
    assert partial["interrupted"] and not (tmp_path / "resumed" / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train_category(params, "widget", manifest, tmp_path / "resumed", progress=False)
    resumed = train_category(params, "widget", manifest, tmp_path / "resumed", progress=False, resume=True)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and not any(k.startswith("expert") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["student"] for h in full["history"]] == [h["student"] for h in resumed["history"]]
    meta = json.loads((tmp_path / "full" / "model.json").read_text())
    assert meta["training"]["iterations_done"] == 4 and meta["preprocessing"]["image_size"] == 64


def test_val_score_selection_uses_only_val_rows(tiny, tmp_path):
    params, manifest = tiny
    p = params.model_copy(update={"train": params.train.model_copy(update={"selection": "val_score"})})
    # poison the test split: if selection touched it, reading these would fail
    poisoned = manifest.copy()
    poisoned.loc[poisoned.split == "test", "path"] = "/nonexistent/test.png"
    summary = train_category(p, "widget", poisoned, tmp_path / "m", progress=False)
    assert [v["iteration"] for v in summary["val_history"]] == [2, 4]
    best = min(summary["val_history"], key=lambda v: v["val_mean_score"])["iteration"]
    assert summary["selected_iteration"] == best
    graph, meta = load_model(tmp_path / "m")
    assert meta["training"]["selected_iteration"] == best


def test_frozen_teacher_features_are_cached_without_changing_the_run(tiny, tmp_path, monkeypatch):
    params, manifest = tiny
    p = params.model_copy(update={"model": params.model.model_copy(update={"expert": False}),
                                  "train": params.train.model_copy(update={"iterations": 8, "checkpoint_every": 8})})
    encoded = []  # batches of normal images the teacher had to encode
    compute = FrozenFeatureCache._compute
    monkeypatch.setattr(FrozenFeatureCache, "_compute", staticmethod(lambda *a: encoded.append(1) or compute(*a)))
    cached = train_category(p, "widget", manifest, tmp_path / "cached", progress=False)
    hits = 8 - len(encoded)
    monkeypatch.setattr("urd.train.step.FEATURE_CACHE_LIMIT_BYTES", 0)
    encoded.clear()
    fresh = train_category(p, "widget", manifest, tmp_path / "fresh", progress=False)
    assert cached["teacher_features_cached"] and not fresh["teacher_features_cached"]
    assert hits >= 4 and len(encoded) == 8  # later epochs are served from the cache; without it, every step encodes
    assert [h["student"] for h in cached["history"]] == [h["student"] for h in fresh["history"]]
    a, b = load_file(str(tmp_path / "cached" / "model.safetensors")), load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not cached["expert_features_cached"]  # there is no expert


def test_the_experts_features_are_cached_without_changing_the_run(tiny, tmp_path, monkeypatch):
    params, manifest = tiny
    p = params.model_copy(update={"model": params.model.model_copy(update={"expert": True}),
                                  "train": params.train.model_copy(update={"iterations": 8, "checkpoint_every": 8})})
    assert p.model.expert
    cached = train_category(p, "widget", manifest, tmp_path / "cached", progress=False)
    monkeypatch.setattr("urd.train.step.FEATURE_CACHE_LIMIT_BYTES", 0)
    fresh = train_category(p, "widget", manifest, tmp_path / "fresh", progress=False)
    assert cached["expert_features_cached"] and not fresh["expert_features_cached"]
    assert not cached["teacher_features_cached"]  # the teacher learns: its features change every step
    assert cached["history"] == fresh["history"] and len(cached["history"]) == 8
    a, b = load_file(str(tmp_path / "cached" / "model.safetensors")), load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
