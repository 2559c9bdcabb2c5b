"""The resumable training loop of one category."""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..checkpoint import build_model, load_checkpoint, model_meta, save_checkpoint, save_model
from ..config import Params
from ..data.foreground import method_for
from ..data.prepare import compute_foreground, load_foreground, load_textures
from ..data.synthesis import AnomalySynthesizer
from ..data.textures import texture_cache
from ..data.torch_data import TrainDataset, to_unit, train_batches
from ..files import atomic_write_text
from ..model.urd import URD
from ..progress import Progress
from ..runtime import ThreadBudget, autocast_for, resolve_device, resolve_num_workers, resolve_precision
from .lifecycle import data_fingerprint, resume_problem, sha256_text
from .step import FrozenFeatureCache, Optimizers, make_optimizers, phase, train_step


def train_category(
    params: Params,
    category: str,
    manifest: pd.DataFrame,
    out_dir: str | Path,
    prepared_dir: str | Path | None = None,
    textures_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int, URD], None] | None = None,
) -> dict[str, Any]:
    """Train one category; writes ``out_dir``/model.safetensors + model.json, checkpoints and the
    training history. ``prepared_dir`` / ``textures_path``: the prepare and textures stages' caches
    (computed here when absent). ``stop_after`` ends the run early after that many iterations (as an
    interruption would), leaving the checkpoint to resume from. ``on_log(iteration, losses)`` is
    called every ``log_every`` iterations, ``on_checkpoint(iteration, model)`` at every checkpoint
    (for studies of the model along a run; it must leave the model's weights alone).
    Returns the training summary."""
    p = params.for_category(category)
    tp = p.train
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "checkpoints" / "last.pt"
    if not resume and checkpoint_path.exists():
        raise FileExistsError(f"{checkpoint_path} exists from an earlier run. Resume it with --resume, or remove {out_dir} to start over.")
    device = resolve_device(tp.device)
    precision = resolve_precision(tp.precision, device)
    autocast = autocast_for(device, precision)
    train_paths = manifest.loc[manifest["split"] == "train", "path"].tolist()
    val_rows = manifest[manifest["split"] == "val"]
    foreground, textures, texture_source = _synthesis_inputs(p, category, train_paths, prepared_dir, textures_path, progress)

    torch.manual_seed(p.seed)
    # channels_last on every device: faster on CPU (bench/results/train_profile_cpu.md), the tensor-core layout on CUDA.
    model = build_model(p).to(device, memory_format=torch.channels_last)
    if p.model.weights == "none" and not resume:
        # A random backbone gets BatchNorm statistics from (up to 64) training images before the
        # expert is copied from it; the weights stay random.
        dataset = TrainDataset(train_paths, p.dataset.image_size)
        images = [to_unit(dataset[i]["image"][None].to(device)) for i in range(min(64, len(dataset)))]
        model.init_random_backbone_statistics(torch.cat(images).split(tp.batch_size))
    optimizers = make_optimizers(model, tp)
    synth = AnomalySynthesizer(p.synthesis, torch.from_numpy(textures).permute(0, 3, 1, 2).contiguous(), seed=p.seed, device=device)
    run = _RunState(p.fingerprint(), data_fingerprint(manifest))
    if resume and checkpoint_path.exists():
        run.restore(load_checkpoint(checkpoint_path), checkpoint_path, model, optimizers, synth)

    num_workers = resolve_num_workers(tp.num_workers)
    batches = train_batches(TrainDataset(train_paths, p.dataset.image_size, foreground), tp.batch_size, num_workers, seed=p.seed,
                            start_batch=run.iteration, pin_memory=device.type == "cuda", keep_incomplete=tp.incomplete_batches == "keep")
    model.train()  # the teacher stays in eval mode when frozen
    teacher_features = None if model.teacher_trainable else FrozenFeatureCache(len(train_paths))
    expert_features = None if model.expert is None else FrozenFeatureCache(len(train_paths))
    end = tp.iterations if stop_after is None else min(tp.iterations, run.iteration + stop_after)
    bar = Progress(tp.iterations, f"train {category}", initial=run.iteration, enabled=progress)
    with ThreadBudget(tp.threads) as budget:
        started = time.perf_counter()
        for iteration in range(run.iteration, end):
            budget.refresh()  # a job started or ended beside this one: take its share of the cores
            with phase("data"):
                batch = next(batches)
                normal = batch["image"].to(device, non_blocking=True).float().div_(255)
            anomalous = mask = None
            with phase("synthesis"):
                if p.model.denoising:
                    anomalous, mask = synth(normal, batch["foreground"].to(device))
                    anomalous = anomalous.contiguous(memory_format=torch.channels_last)
            normal = normal.contiguous(memory_format=torch.channels_last)
            teacher_normal = expert_normal = None
            if teacher_features is not None:
                with phase("teacher_features"):
                    teacher_normal = teacher_features(model.teacher, normal, batch["index"], autocast())
            if expert_features is not None:
                with phase("expert"):
                    expert_normal = expert_features(model.expert, normal, batch["index"], autocast())
            losses = train_step(model, optimizers, normal, anomalous, mask, p.model.teacher_synthetic_term, autocast(),
                                teacher_normal, expert_normal, p.model.teacher_mask, tp.student_passes)
            if not all(math.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"loss became {losses} at iteration {iteration + 1}; lower the learning rates or use precision fp32")
            bar.update(1, losses)
            run.iteration = done = iteration + 1
            if done % tp.log_every == 0 or done == tp.iterations:
                run.history.append({"iteration": done, **losses})
                if on_log is not None:
                    on_log(done, losses)
            if done % tp.checkpoint_every == 0 or done == tp.iterations:
                if on_checkpoint is not None:
                    on_checkpoint(done, model)
                if tp.selection == "val_score" and len(val_rows):
                    run.score_on_val(model, val_rows, p, category, out_dir, device, autocast)
                save_checkpoint(checkpoint_path, run.checkpoint(model, optimizers, synth))
    bar.close()

    summary: dict[str, Any] = {
        "category": category, "iterations_done": end, "iterations": tp.iterations, "device": str(device),
        "precision": precision, "precision_requested": tp.precision, "num_workers": num_workers, **budget.record(),
        "teacher_features_cached": teacher_features is not None and teacher_features.enabled,
        "expert_features_cached": expert_features is not None and expert_features.enabled, "seconds": time.perf_counter() - started,
        "train_images": len(train_paths), "val_images": len(val_rows), "selection": tp.selection, "texture_source": texture_source,
        "dtd_root": p.synthesis.dtd_root, "params_sha256": sha256_text(run.params_json), "data_sha256": run.data,
        "history": run.history, "val_history": run.val_history,
    }
    if end < tp.iterations:
        return summary | {"interrupted": True}
    return _finish(model, p, category, out_dir, summary, run.best, end)


def _synthesis_inputs(p: Params, category: str, train_paths: list[str], prepared_dir: str | Path | None, textures_path: str | Path | None,
                      progress: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Foreground masks of the training images and the texture bank: from the prepare and textures
    stages' caches when given, else computed now."""
    size = p.dataset.image_size
    if prepared_dir is not None and (Path(prepared_dir) / "foreground.npz").is_file():
        foreground = load_foreground(Path(prepared_dir) / "foreground.npz", train_paths)
    else:
        foreground = compute_foreground(train_paths, size, method_for(category, p.synthesis.foreground, p.dataset.name), progress)
    if textures_path is not None and Path(textures_path).is_file():
        textures, texture_source = load_textures(textures_path)
    else:
        textures, texture_source = texture_cache(size, p.synthesis.dtd_root or None, seed=p.seed, progress=progress)
    if texture_source == "procedural" and p.synthesis.dtd_root:
        warnings.warn(f"synthesis.dtd_root is {p.synthesis.dtd_root!r} but no DTD images were found there: training on procedural "
                      "textures instead of DTD (the paper's texture source). The model card will say so.", stacklevel=3)
    return foreground, textures, texture_source


class _RunState:
    """What a checkpoint carries besides the weights: where the run is, its history, its best val
    score, and the params and images it trains on (urd.train.lifecycle)."""

    def __init__(self, params_json: str, data: str) -> None:
        self.params_json, self.data = params_json, data
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.val_history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None

    def restore(self, state: dict[str, Any], path: Path, model: URD, optimizers: Optimizers, synth: AnomalySynthesizer) -> None:
        problem = resume_problem(state, path, self.params_json, self.data)
        if problem:
            raise ValueError(problem)
        model.load_state_dict(state["model"])
        optimizers.student.load_state_dict(state["optimizer_student"])
        if optimizers.teacher is not None:
            optimizers.teacher.load_state_dict(state["optimizer_teacher"])
        torch.set_rng_state(state["rng"]["torch"])
        synth.generator.set_state(state["rng"]["synthesis"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.iteration = int(state["iteration"])
        self.history, self.val_history, self.best = (json.loads(state[k]) for k in ("history", "val_history", "best"))

    def checkpoint(self, model: URD, optimizers: Optimizers, synth: AnomalySynthesizer) -> dict[str, Any]:
        rng: dict[str, Tensor] = {"torch": torch.get_rng_state(), "synthesis": synth.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {
            "model": model.state_dict(),
            "optimizer_student": optimizers.student.state_dict(),
            **({"optimizer_teacher": optimizers.teacher.state_dict()} if optimizers.teacher is not None else {}),
            "rng": rng, "iteration": self.iteration, "history": json.dumps(self.history), "val_history": json.dumps(self.val_history),
            "best": json.dumps(self.best), "params": self.params_json, "data": self.data,
        }

    def score_on_val(self, model: URD, val_rows: pd.DataFrame, p: Params, category: str, out_dir: Path, device, autocast) -> None:
        """train.selection: val_score: the mean anomaly score of the val split; the best model so far goes to out_dir/best."""
        # Imported here: only this selection scores, and urd/scoring.py is not a dependency of the
        # train stage in dvc.yaml (the default, "last", never reads it).
        from ..scoring import score_images

        _, val_scores, _ = score_images(model.inference_graph(), val_rows, p.dataset.image_size, device, p.train.batch_size, autocast)
        self.val_history.append({"iteration": self.iteration, "val_mean_score": float(val_scores.mean())})
        if self.best is None or self.val_history[-1]["val_mean_score"] < self.best["val_mean_score"]:
            self.best = self.val_history[-1]
            save_model(model, model_meta(p, category), out_dir / "best")


def _finish(model: URD, p: Params, category: str, out_dir: Path, summary: dict[str, Any], best: dict[str, float] | None,
            end: int) -> dict[str, Any]:
    """Keep the selected model (the last iterate, or the best val score), write model.json and
    training.json, and remove the checkpoint, which only serves to resume an interrupted run (kept,
    a later run with new code would "resume" the finished one)."""
    meta = model_meta(p, category)
    selected = end
    if p.train.selection == "val_score" and best is not None:
        selected = best["iteration"]
        for name in ("model.safetensors", "model.json"):
            (out_dir / "best" / name).replace(out_dir / name)
        (out_dir / "best").rmdir()
    else:
        save_model(model, meta, out_dir)
    summary = summary | {"selected_iteration": selected}
    meta["training"] = {k: v for k, v in summary.items() if k not in ("history", "val_history")}
    atomic_write_text(out_dir / "model.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(out_dir / "training.json", json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return summary
