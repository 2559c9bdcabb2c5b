"""One category's training: optimisers and the Expert-Teacher-Student training step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import TrainParams
from .model.losses import student_loss, teacher_loss
from .model.urd import URD


@dataclass
class Optimizers:
    teacher: torch.optim.Optimizer | None  # None when the teacher is frozen (expert off)
    student: torch.optim.Optimizer


def make_optimizers(model: URD, train: TrainParams) -> Optimizers:
    """Two Adam optimisers (paper: teacher lr 1e-4, student lr 5e-3, betas (0.5, 0.999))."""
    teacher = None
    if model.teacher_trainable:
        teacher = torch.optim.Adam(model.teacher_parameters(), lr=train.lr_teacher, betas=train.betas)
    student = torch.optim.Adam(model.student_parameters(), lr=train.lr_student, betas=train.betas)
    return Optimizers(teacher, student)


def train_step(
    model: URD,
    optimizers: Optimizers,
    normal: Tensor,
    anomalous: Tensor | None,
    mask: Tensor | None,
    teacher_synthetic_term: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """One step in the order of the authors' release (NOTES.md):

    1. expert features of I_n (and I_a for the release term), without gradient;
    2. teacher step on L_TE, teacher in train mode, on its own optimizer;
    3. teacher switched to eval mode, its features recomputed without gradient;
    4. student (bottleneck + decoder + GII) step on L_S, on its own optimizer.

    ``anomalous``/``mask`` are None for plain RD (no denoising). Returns the losses as floats.
    """
    autocast = autocast or contextlib.nullcontext()
    model.train()
    losses: dict[str, float] = {}

    expert_normal = expert_anomalous = None
    if model.expert is not None:
        with torch.no_grad(), autocast:
            expert_normal = model.expert(normal)
            if teacher_synthetic_term:
                expert_anomalous = model.expert(anomalous)

    if optimizers.teacher is not None:
        if anomalous is None or mask is None or expert_normal is None:
            raise ValueError("the teacher step needs the expert, a synthetic anomalous batch and its mask")
        model.teacher.train()
        with autocast:
            loss_t = teacher_loss(model.teacher(normal), model.teacher(anomalous), expert_normal, mask, expert_anomalous)
        optimizers.teacher.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizers.teacher.step()
        losses["teacher"] = loss_t.item()

    model.teacher.eval()
    with torch.no_grad(), autocast:
        teacher_normal = [f.detach() for f in model.teacher(normal)]
        teacher_anomalous = None if anomalous is None else [f.detach() for f in model.teacher(anomalous)]

    with autocast:
        student_normal = model.student(teacher_normal)
        student_anomalous = None if teacher_anomalous is None else model.student(teacher_anomalous)
        loss_s = student_loss(student_normal, student_anomalous, teacher_normal, expert_normal)
    optimizers.student.zero_grad(set_to_none=True)
    loss_s.backward()
    optimizers.student.step()
    losses["student"] = loss_s.item()
    return losses
