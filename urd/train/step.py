"""The Expert-Teacher-Student training step (in the authors' release's order), its optimisers, and
the cache of a frozen encoder's features."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import TrainParams
from ..model.backbone import Encoder
from ..model.losses import student_loss, teacher_loss
from ..model.urd import URD


@dataclass
class Optimizers:
    teacher: torch.optim.Optimizer | None  # None when the teacher is frozen (expert off)
    student: torch.optim.Optimizer


def make_optimizers(model: URD, train: TrainParams) -> Optimizers:
    """Two Adam optimisers (paper: teacher lr 1e-4, student lr 5e-3, betas (0.5, 0.999)). The fused
    kernel is the same update in one pass over all parameters, and faster (bench/results/train_profile_cpu.md)."""
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
    convolution calls, whose per-call cost dominates at small feature maps (bench/README.md, "What we
    learned"). BatchNorm's
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
    teacher_mask: str = "direct",
    student_passes: str = "joint",
) -> dict[str, float]:
    """One step in the order of the authors' release (https://github.com/hito2448/URD at commit 95dd027):

    1. expert features of I_n (and I_a for the release term), without gradient;
    2. teacher step on L_TE, teacher in train mode (eval mode with ``teacher_batchnorm: frozen``),
       on its own optimizer;
    3. teacher switched to eval mode, its features recomputed without gradient;
    4. student (bottleneck + decoder + GII) step on L_S, on its own optimizer; the student sees
       I_n and I_a in one pass (:func:`student_pass`), or, with ``student_passes="separate"``, once
       per batch as the release does.

    ``anomalous``/``mask`` are None for plain RD (no denoising). Returns the losses as floats.
    ``autocast`` (bf16) covers the networks; losses and cosines are computed in fp32.
    ``teacher_normal`` / ``expert_normal``: the frozen teacher's / the expert's features of
    ``normal`` when they are already known (:class:`FrozenFeatureCache`); a trainable teacher's
    change every step, so passing them then is an error, as is passing expert features without an expert.
    ``teacher_mask``: how the mask reaches each scale of L_TE (urd.model.losses.teacher_masks).
    """
    if student_passes not in ("joint", "separate"):
        raise ValueError(f"student_passes must be 'joint' or 'separate' (got {student_passes!r})")
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
            loss_t = teacher_loss(teacher_n, teacher_a, expert_normal, mask, expert_anomalous, teacher_mask)
        losses["teacher"] = _update(optimizers.teacher, loss_t, "teacher")

    model.teacher.eval()
    with phase("teacher_features"), torch.no_grad(), autocast:
        if teacher_normal is None:
            teacher_normal = [f.detach() for f in model.teacher(normal)]
        teacher_anomalous = None if anomalous is None else [f.detach() for f in model.teacher(anomalous)]

    with phase("student_forward"):
        with autocast:
            if student_passes == "joint":
                student_normal, student_anomalous = student_pass(model, teacher_normal, teacher_anomalous)
            else:
                student_normal = model.student(teacher_normal)
                student_anomalous = None if teacher_anomalous is None else model.student(teacher_anomalous)
        loss_s = student_loss(student_normal, student_anomalous, teacher_normal, expert_normal)
    losses["student"] = _update(optimizers.student, loss_s, "student")
    return losses


def _update(optimizer: torch.optim.Optimizer, loss: Tensor, network: str) -> float:
    """Backward and one optimiser step for ``network`` (teacher or student); the loss as a float."""
    with phase(f"{network}_backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimizer"):
        optimizer.step()
    return loss.item()
