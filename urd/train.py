"""One category's training: optimisers, the Expert-Teacher-Student step, and the resumable loop."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import pandas as pd
import torch
from torch import Tensor

from .checkpoint import build_model, load_checkpoint, model_meta, save_checkpoint, save_model
from .files import MODEL_WEIGHTS, atomic_write_text
from .config import Params, TrainParams
from .data.prepare import compute_foreground, load_foreground, load_textures
from .data.foreground import method_for
from .data.synthesis import AnomalySynthesizer
from .data.textures import texture_cache
from .data.torch_data import TrainDataset, to_unit, train_batches
from .model.backbone import Encoder
from .model.losses import student_loss, teacher_loss
from .model.urd import URD
from .progress import Progress
from .runtime import ThreadBudget, autocast_for, resolve_device, resolve_num_workers, resolve_precision


@dataclass
class Optimizers:
    teacher: torch.optim.Optimizer | None  # None when the teacher is frozen (expert off)
    student: torch.optim.Optimizer


def make_optimizers(model: URD, train: TrainParams) -> Optimizers:
    """Two Adam optimisers (paper: teacher lr 1e-4, student lr 5e-3, betas (0.5, 0.999)). The fused
    kernel is the same update in one pass over all parameters: 3 ms instead of 6 per step on CPU at
    the demo settings."""
    teacher = None
    if model.teacher_trainable:
        teacher = torch.optim.Adam(model.teacher_parameters(), lr=train.lr_teacher, betas=train.betas, fused=True)
    student = torch.optim.Adam(model.student_parameters(), lr=train.lr_student, betas=train.betas, fused=True)
    return Optimizers(teacher, student)


def phase(name: str) -> torch.profiler.record_function:
    """A named range of the training iteration (``urd.<name>``) for torch.profiler; free when no
    profiler runs. bench/train_profile.py reads them to say where an iteration's time goes."""
    return torch.profiler.record_function(f"urd.{name}")


# Features of the training images are kept when all of them fit in this many bytes (Lite0 at 96 px:
# 47 KB per image in bf16; wide_resnet50_2 at 256 px: 3.7 MB, so 290 images).
FEATURE_CACHE_LIMIT_BYTES = 1 << 30


class FrozenFeatureCache:
    """A frozen encoder's features of the normal training images, computed once per image.

    An eval-mode network with fixed weights maps an image to the same features every time, and
    training images are not augmented, so its pass over I_n need not be repeated in later epochs.
    The loop keeps one for the expert (always frozen) and one for the teacher when it is frozen
    (``model.expert: false``); a trainable teacher's features change every step. The synthetic I_a
    are new every iteration and are always encoded. When the features of every training image would
    not fit in ``limit_bytes`` (default :data:`FEATURE_CACHE_LIMIT_BYTES`), nothing is kept.
    """

    def __init__(self, num_images: int, limit_bytes: int | None = None) -> None:
        self.num_images = num_images
        self.limit_bytes = FEATURE_CACHE_LIMIT_BYTES if limit_bytes is None else limit_bytes
        self.features: list[Tensor] | None = None  # per scale: N x C x h x w
        self.filled: Tensor | None = None  # N bool
        self.enabled = True

    def __call__(self, encoder: Encoder, images: Tensor, indices: Tensor, autocast: contextlib.AbstractContextManager) -> list[Tensor]:
        """Features of ``images`` (B x 3 x S x S, the training images at ``indices``) -> [F^1..3]."""
        if not self.enabled:
            return self._compute(encoder, images, autocast)
        indices = indices.to(images.device)
        if self.features is None:
            computed = self._compute(encoder, images, autocast)
            per_image = sum(f[0].numel() * f.element_size() for f in computed)
            if per_image * self.num_images > self.limit_bytes:
                self.enabled = False
                return computed
            self.features = [torch.empty((self.num_images, *f.shape[1:]), dtype=f.dtype, device=f.device, memory_format=torch.channels_last) for f in computed]
            self.filled = torch.zeros(self.num_images, dtype=torch.bool, device=images.device)
            self._store(indices, computed)
        else:
            if not self.filled[indices].all():
                # The whole batch, as an uncached step would encode it: convolutions may round
                # differently at another batch size, and the cache must not change the run.
                computed = self._compute(encoder, images, autocast)
                self._store(indices, computed)
                return computed
        return [f[indices] for f in self.features]

    @staticmethod
    def _compute(encoder: Encoder, images: Tensor, autocast: contextlib.AbstractContextManager) -> list[Tensor]:
        # Checked where the encoder runs (the first call always does), not on every cache hit.
        if encoder.training or any(p.requires_grad for p in encoder.parameters()):
            raise ValueError("FrozenFeatureCache needs a frozen encoder in eval mode (the expert, or the teacher with model.expert: false)")
        with torch.no_grad(), autocast:
            return [f.detach() for f in encoder(images)]

    def _store(self, indices: Tensor, features: list[Tensor]) -> None:
        for cache, f in zip(self.features, features):
            cache[indices] = f
        self.filled[indices] = True


def student_pass(model: URD, teacher_normal: list[Tensor], teacher_anomalous: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor] | None]:
    """F_S of I_n and of I_a in one pass over the 2B images, split back into the two halves.

    The authors' release runs the student twice, once per batch. One pass halves the number of
    convolution calls, whose per-call cost dominates at small feature maps (the CPU training loop at
    the demo settings 1.16x faster in fp32, 1.37x in bf16; bench/README.md "Speed"). BatchNorm's
    batch statistics then cover normal and synthetic images together, as for one batch of 2B; test
    metrics moved within the seed spread (the same section). Without I_a (plain RD): F_S(I_n), None."""
    if teacher_anomalous is None:
        return model.student(teacher_normal), None
    batch = len(teacher_normal[0])
    both = model.student([torch.cat(pair) for pair in zip(teacher_normal, teacher_anomalous)])
    return [f[:batch] for f in both], [f[batch:] for f in both]


def train_step(
    model: URD,
    optimizers: Optimizers,
    normal: Tensor,
    anomalous: Tensor | None,
    mask: Tensor | None,
    teacher_synthetic_term: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
    teacher_normal: list[Tensor] | None = None,
    expert_normal: list[Tensor] | None = None,
) -> dict[str, float]:
    """One step in the order of the authors' release (https://github.com/hito2448/URD at commit 95dd027):

    1. expert features of I_n (and I_a for the release term), without gradient;
    2. teacher step on L_TE, teacher in train mode (eval mode with ``teacher_batchnorm: frozen``),
       on its own optimizer;
    3. teacher switched to eval mode, its features recomputed without gradient;
    4. student (bottleneck + decoder + GII) step on L_S, on its own optimizer; the student sees
       I_n and I_a in one pass (:func:`student_pass`), where the release runs it once per batch.

    ``anomalous``/``mask`` are None for plain RD (no denoising). Returns the losses as floats.
    ``autocast`` (bf16) covers the networks; losses and cosines are computed in fp32.
    ``teacher_normal`` / ``expert_normal``: the frozen teacher's / the expert's features of
    ``normal`` when they are already known (:class:`FrozenFeatureCache`); a trainable teacher's
    change every step, so passing them then is an error, as is passing expert features without an expert.
    """
    if teacher_normal is not None and optimizers.teacher is not None:
        raise ValueError("teacher_normal can only be passed when the teacher is frozen (model.expert: false)")
    if expert_normal is not None and model.expert is None:
        raise ValueError("expert_normal was passed but the model has no expert (model.expert: false)")
    autocast = autocast or contextlib.nullcontext()
    model.train()
    losses: dict[str, float] = {}

    expert_anomalous = None
    if model.expert is not None:
        with phase("expert"), torch.no_grad(), autocast:
            if expert_normal is None:
                expert_normal = model.expert(normal)
            if teacher_synthetic_term:
                expert_anomalous = model.expert(anomalous)

    if optimizers.teacher is not None:
        if anomalous is None or mask is None or expert_normal is None:
            raise ValueError("the teacher step needs the expert, a synthetic anomalous batch and its mask")
        model.teacher.train(model.teacher_batchnorm == "train")
        with phase("teacher_forward"):
            with autocast:
                teacher_n, teacher_a = model.teacher(normal), model.teacher(anomalous)
            loss_t = teacher_loss(teacher_n, teacher_a, expert_normal, mask, expert_anomalous)
        with phase("teacher_backward"):
            optimizers.teacher.zero_grad(set_to_none=True)
            loss_t.backward()
        with phase("optimizer"):
            optimizers.teacher.step()
        losses["teacher"] = loss_t.item()

    model.teacher.eval()
    with phase("teacher_features"), torch.no_grad(), autocast:
        if teacher_normal is None:
            teacher_normal = [f.detach() for f in model.teacher(normal)]
        teacher_anomalous = None if anomalous is None else [f.detach() for f in model.teacher(anomalous)]

    with phase("student_forward"):
        with autocast:
            student_normal, student_anomalous = student_pass(model, teacher_normal, teacher_anomalous)
        loss_s = student_loss(student_normal, student_anomalous, teacher_normal, expert_normal)
    with phase("student_backward"):
        optimizers.student.zero_grad(set_to_none=True)
        loss_s.backward()
    with phase("optimizer"):
        optimizers.student.step()
    losses["student"] = loss_s.item()
    return losses


# ----------------------------------------------------------------------------------------- the loop


def resume_problem(state: dict[str, Any], checkpoint_path: Path, params_json: str, data: str) -> str | None:
    """Why the checkpoint ``state`` cannot be resumed with these params (``Params.fingerprint``)
    and data (:func:`data_fingerprint`), or None. The one resume-compatibility rule."""
    if state.get("params") != params_json:
        return (f"{checkpoint_path} was written with other params than params.yaml has now; resuming would mix two "
                f"runs. Remove {checkpoint_path.parent} to start over, or restore the params it was trained with.")
    if state.get("data") != data:
        return (f"{checkpoint_path} was written while training on other images (the train/val split changed since); resuming "
                f"would mix two datasets. Remove {checkpoint_path.parent} to start over.")
    return None


@dataclass(frozen=True)
class TrainingPlan:
    """What a run of one category does in its model folder, and why (said to the user)."""

    action: Literal["train", "resume", "up_to_date"]
    reason: str


def plan_training(params: Params, category: str, manifest: pd.DataFrame, out_dir: str | Path) -> TrainingPlan:
    """The one lifecycle rule for a model folder: resume an interrupted run that matches these
    params and images; train afresh when there is no model, when the interrupted run or the
    finished model was made with other params or images (the caller removes a stale
    ``checkpoints/``: a working folder, not a result); else the model is up to date."""
    out_dir = Path(out_dir)
    params_json = params.for_category(category).fingerprint()
    data = data_fingerprint(manifest)
    checkpoint_path = out_dir / "checkpoints" / "last.pt"
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        problem = resume_problem(state, checkpoint_path, params_json, data)
        if problem is None:
            total = params.for_category(category).train.iterations
            return TrainingPlan("resume", f"resuming the interrupted run of {category} at iteration {int(state['iteration'])} of {total}")
        return TrainingPlan("train", f"training {category} afresh: the interrupted run cannot be resumed ({problem.split(';')[0]})")
    record = out_dir / "training.json"
    if not (out_dir / MODEL_WEIGHTS).is_file() or not record.is_file():
        return TrainingPlan("train", f"training {category}: {out_dir} holds no trained model yet")
    trained = json.loads(record.read_text())
    if trained.get("data_sha256") != data:
        return TrainingPlan("train", f"retraining {category}: its training images changed since the model in {out_dir} was trained "
                                     f"({trained.get('train_images', '?')} train + {trained.get('val_images', '?')} val then, "
                                     f"{int((manifest['split'] == 'train').sum())} + {int((manifest['split'] == 'val').sum())} now, or their contents)")
    if trained.get("params_sha256") != _sha256(params_json):
        return TrainingPlan("train", f"retraining {category}: its params changed since the model in {out_dir} was trained")
    return TrainingPlan("up_to_date", f"{category}: the model in {out_dir} was trained on these images with these params")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 over the contents of the images training reads (train and val splits), in order."""
    rows = manifest[manifest["split"].isin(["train", "val"])]
    return hashlib.sha256("\n".join(rows["split"] + ":" + rows["sha256"].astype(str)).encode()).hexdigest()


def _rng_state(synth: AnomalySynthesizer) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "synthesis": synth.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(synth: AnomalySynthesizer, state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    synth.generator.set_state(state["synthesis"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    training history. ``stop_after`` ends the run early after that many iterations (as an
    interruption would), leaving the checkpoint to resume from. ``on_log(iteration, losses)`` is
    called every ``log_every`` iterations, ``on_checkpoint(iteration, model)`` at every checkpoint
    (for studies of the model along a run; it must leave the model's weights alone).
    Returns the training summary."""
    p = params.for_category(category)
    tp = p.train
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "checkpoints" / "last.pt"
    if not resume and checkpoint_path.exists():
        raise FileExistsError(
            f"{checkpoint_path} exists from an earlier run. Resume it with --resume, or remove {out_dir} to start over."
        )
    device = resolve_device(tp.device)
    precision = resolve_precision(tp.precision, device)
    autocast = autocast_for(device, precision)
    size = p.dataset.image_size

    train_paths = manifest.loc[manifest["split"] == "train", "path"].tolist()
    val_rows = manifest[manifest["split"] == "val"]
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
                      "textures instead of DTD (the paper's texture source). The model card will say so.", stacklevel=2)

    torch.manual_seed(p.seed)
    # channels_last on every device: on CPU a training step at the demo settings ran 1.5x faster in
    # fp32 and no slower in bf16 (bench/results/train_profile_cpu.md); on CUDA it is the tensor-core layout.
    model = build_model(p).to(device, memory_format=torch.channels_last)
    if p.model.weights == "none" and not resume:
        # A random backbone gets BatchNorm statistics from (up to 64) training images before
        # the expert is copied from it; the weights stay random.
        dataset = TrainDataset(train_paths, size)
        images = [to_unit(dataset[i]["image"][None].to(device)) for i in range(min(64, len(dataset)))]
        model.init_random_backbone_statistics(torch.cat(images).split(tp.batch_size))
    optimizers = make_optimizers(model, tp)
    synth = AnomalySynthesizer(p.synthesis, torch.from_numpy(textures).permute(0, 3, 1, 2).contiguous(), seed=p.seed, device=device)

    start, history, val_history, best = 0, [], [], None
    params_json = p.fingerprint()
    data = data_fingerprint(manifest)
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        problem = resume_problem(state, checkpoint_path, params_json, data)
        if problem:
            raise ValueError(problem)
        model.load_state_dict(state["model"])
        optimizers.student.load_state_dict(state["optimizer_student"])
        if optimizers.teacher is not None:
            optimizers.teacher.load_state_dict(state["optimizer_teacher"])
        _restore_rng(synth, state["rng"])
        start = int(state["iteration"])
        history = json.loads(state["history"])
        val_history = json.loads(state["val_history"])
        best = json.loads(state["best"])

    num_workers = resolve_num_workers(tp.num_workers)
    batches = train_batches(TrainDataset(train_paths, size, foreground), tp.batch_size, num_workers, seed=p.seed,
                            start_batch=start, pin_memory=device.type == "cuda")
    model.train()  # the teacher stays in eval mode when frozen
    teacher_features = None if model.teacher_trainable else FrozenFeatureCache(len(train_paths))
    expert_features = None if model.expert is None else FrozenFeatureCache(len(train_paths))
    end = tp.iterations if stop_after is None else min(tp.iterations, start + stop_after)
    bar = Progress(tp.iterations, f"train {category}", initial=start, enabled=progress)
    with ThreadBudget(tp.threads) as budget:
        started = time.perf_counter()
        for iteration in range(start, end):
            budget.refresh()  # a job started or ended beside this one: take its share of the cores
            with phase("data"):
                batch = next(batches)
                images = batch["image"].to(device, non_blocking=True).float().div_(255)
            anomalous = mask = None
            with phase("synthesis"):
                if p.model.denoising:
                    anomalous, mask = synth(images, batch["foreground"].to(device))
                    anomalous = anomalous.contiguous(memory_format=torch.channels_last)
            normal = images.contiguous(memory_format=torch.channels_last)
            teacher_normal = expert_normal = None
            if teacher_features is not None:
                with phase("teacher_features"):
                    teacher_normal = teacher_features(model.teacher, normal, batch["index"], autocast())
            if expert_features is not None:
                with phase("expert"):
                    expert_normal = expert_features(model.expert, normal, batch["index"], autocast())
            losses = train_step(model, optimizers, normal, anomalous, mask, p.model.teacher_synthetic_term, autocast(),
                                teacher_normal, expert_normal)
            if not all(math.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"loss became {losses} at iteration {iteration + 1}; lower the learning rates or use precision fp32")
            bar.update(1, losses)
            done = iteration + 1
            if done % tp.log_every == 0 or done == tp.iterations:
                history.append({"iteration": done, **losses})
                if on_log is not None:
                    on_log(done, losses)
            if done % tp.checkpoint_every == 0 or done == tp.iterations:
                if on_checkpoint is not None:
                    on_checkpoint(done, model)
                if tp.selection == "val_score" and len(val_rows):
                    # Imported here: only this selection scores, and urd/scoring.py is not a dependency of
                    # the train stage in dvc.yaml (the default, "last", never reads it).
                    from .scoring import score_images

                    _, val_scores, _ = score_images(model.inference_graph(), val_rows, size, device, tp.batch_size, autocast)
                    val_history.append({"iteration": done, "val_mean_score": float(val_scores.mean())})
                    if best is None or val_history[-1]["val_mean_score"] < best["val_mean_score"]:
                        best = val_history[-1]
                        save_model(model, model_meta(p, category), out_dir / "best")
                save_checkpoint(checkpoint_path, {
                    "model": model.state_dict(),
                    "optimizer_student": optimizers.student.state_dict(),
                    **({"optimizer_teacher": optimizers.teacher.state_dict()} if optimizers.teacher is not None else {}),
                    "rng": _rng_state(synth),
                    "iteration": done,
                    "history": json.dumps(history),
                    "val_history": json.dumps(val_history),
                    "best": json.dumps(best),
                    "params": params_json,
                    "data": data,
                })
    bar.close()
    elapsed = time.perf_counter() - started

    summary: dict[str, Any] = {
        "category": category, "iterations_done": end, "iterations": tp.iterations, "device": str(device),
        "precision": precision, "precision_requested": tp.precision, "num_workers": num_workers, **budget.record(),
        "teacher_features_cached": teacher_features is not None and teacher_features.enabled,
        "expert_features_cached": expert_features is not None and expert_features.enabled, "seconds": elapsed, "train_images": len(train_paths), "val_images": len(val_rows),
        "selection": tp.selection, "texture_source": texture_source, "dtd_root": p.synthesis.dtd_root,
        "params_sha256": _sha256(params_json), "data_sha256": data, "history": history, "val_history": val_history,
    }
    if end < tp.iterations:
        summary["interrupted"] = True
        return summary
    # The model kept: the last iterate, or the checkpoint with the lowest mean val score.
    meta = model_meta(p, category)
    selected = end
    if tp.selection == "val_score" and best is not None:
        selected = best["iteration"]
        for name in ("model.safetensors", "model.json"):
            (out_dir / "best" / name).replace(out_dir / name)
        (out_dir / "best").rmdir()
    else:
        save_model(model, meta, out_dir)
    meta["training"] = {k: v for k, v in summary.items() if k not in ("history", "val_history")} | {"selected_iteration": selected}
    atomic_write_text(out_dir / "model.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(out_dir / "training.json", json.dumps(summary | {"selected_iteration": selected}, indent=2) + "\n")
    # The checkpoint only serves to resume an interrupted run; kept, a later run (new code) would
    # "resume" the finished one.
    shutil.rmtree(checkpoint_path.parent, ignore_errors=True)
    return summary | {"selected_iteration": selected}
