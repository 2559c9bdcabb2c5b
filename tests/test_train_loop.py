import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from urd.calibrate import calibrate, normalize_scores
from urd.checkpoint import load_model
from urd.config import CalibrateParams, parse_params
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


def test_calibration_quantile_and_normalisation():
    rng = np.random.default_rng(0)
    val_scores = rng.random(200)
    val_maps = rng.random((200, 4, 4))
    c = calibrate(CalibrateParams(target_fpr=0.05, pixel_target_fpr=0.01), val_scores, val_maps)
    assert c["method"] == "val_quantile" and c["image_fpr_resolution"] == pytest.approx(1 / len(val_scores))
    assert 0.03 <= (val_scores >= c["image_threshold"]).mean() <= 0.05
    assert normalize_scores(c["image_threshold"], c["image_threshold"], c["image_min"], c["image_max"]) == pytest.approx(0.5)
    assert normalize_scores(np.array([-5.0, 99.0]), c["image_threshold"], c["image_min"], c["image_max"]).tolist() == [0.0, 1.0]


def test_calibration_with_labelled_anomalies_is_f1_optimal():
    val_scores = np.array([0.1, 0.2, 0.3, 0.35])
    anomaly_scores = np.array([0.4, 0.5, 0.33])
    c = calibrate(CalibrateParams(), val_scores, np.zeros((4, 2, 2)), anomaly_scores, np.ones((3, 2, 2)), np.ones((3, 2, 2), bool))
    assert c["method"] == "f1_calibration_set" and c["image_threshold"] == pytest.approx(0.33)  # F1 6/7: TP 3, FP 1 (0.35)
    assert c["pixel_threshold"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="val"):
        calibrate(CalibrateParams(), np.zeros(0), np.zeros((0, 2, 2)))


def test_precision_auto_is_bf16_only_where_the_hardware_runs_it(monkeypatch):
    import torch

    import urd.runtime as runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})  # the EPYC that emulated bf16 at 0.07x fp32
    assert runtime.resolve_precision("auto", cpu) == "fp32" and runtime.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert runtime.resolve_precision("auto", cpu) == "bf16" and runtime.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert isinstance(runtime.autocast_for(cpu, "auto")(), torch.autocast)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set())
    assert not isinstance(runtime.autocast_for(cpu, "auto")(), torch.autocast)


def test_num_workers_auto_leaves_small_machines_the_cores(monkeypatch):
    import urd.runtime as runtime
    from urd.config import parse_params

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.resolve_num_workers("auto") == 0  # 2 cores: the loop was fastest without workers
    monkeypatch.setattr(runtime, "usable_cores", lambda: 16)
    assert runtime.resolve_num_workers("auto") == 4 and runtime.resolve_num_workers(1) == 1
    assert parse_params({}).train.num_workers == "auto" and parse_params({"train": {"num_workers": 3}}).train.num_workers == 3
    for bad in (-1, "many"):
        with pytest.raises(ValueError, match="num_workers"):
            parse_params({"train": {"num_workers": bad}})


def test_frozen_teacher_features_are_cached_without_changing_the_run(tiny, tmp_path, monkeypatch):
    params, manifest = tiny
    p = params.model_copy(update={"model": params.model.model_copy(update={"expert": False}),
                                  "train": params.train.model_copy(update={"iterations": 8, "checkpoint_every": 8})})
    encoded = []  # batches of normal images the teacher had to encode
    compute = FrozenFeatureCache._compute
    monkeypatch.setattr(FrozenFeatureCache, "_compute", staticmethod(lambda *a: encoded.append(1) or compute(*a)))
    cached = train_category(p, "widget", manifest, tmp_path / "cached", progress=False)
    hits = 8 - len(encoded)
    monkeypatch.setattr("urd.train.FEATURE_CACHE_LIMIT_BYTES", 0)
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
    monkeypatch.setattr("urd.train.FEATURE_CACHE_LIMIT_BYTES", 0)
    fresh = train_category(p, "widget", manifest, tmp_path / "fresh", progress=False)
    assert cached["expert_features_cached"] and not fresh["expert_features_cached"]
    assert not cached["teacher_features_cached"]  # the teacher learns: its features change every step
    assert cached["history"] == fresh["history"] and len(cached["history"]) == 8
    a, b = load_file(str(tmp_path / "cached" / "model.safetensors")), load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
