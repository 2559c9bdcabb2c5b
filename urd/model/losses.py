"""Training losses of the Expert-Teacher-Student network.

Notation (paper, "Reverse Distillation with Expert"): I_n a normal image, I_a its synthetic anomaly,
M the synthetic mask; F_T = teacher features, F_E = expert features, F_S = student features, each a
list of three scales [F^1, F^2, F^3]. Cosines are computed in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_distance_map(a: Tensor, b: Tensor) -> Tensor:
    """Eq. (1): per-pixel 1 - cos over channels. B x C x H x W (twice) -> B x H x W, in fp32."""
    with torch.autocast(a.device.type, enabled=False):
        return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=1)


def flat_cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Eq. (4)-(5): 1 - cos of the flattened feature maps, one value per sample, averaged over the batch (fp32)."""
    with torch.autocast(a.device.type, enabled=False):
        return (1.0 - F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)).mean()


def teacher_masks(mask: Tensor, sizes: list[tuple[int, int]], mode: str = "direct") -> list[Tensor]:
    """M^i at each feature scale (largest first): the B x 1 x H x W mask -> B x h x w binary masks.

    ``direct``: the full-resolution mask resized to each scale (bilinear) and binarised at 0.5, so
    each scale gets the footprint of the anomaly at that scale without compounding the rounding of
    the scale above; the paper only says M is resized. ``cascade``: the authors' release, full ->
    first scale -> second -> third, each step bilinear with align_corners and kept where >= 0.5."""
    if mode == "direct":
        return [(F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False) > 0.5).float().squeeze(1) for size in sizes]
    if mode != "cascade":
        raise ValueError(f"teacher mask mode must be 'direct' or 'cascade' (got {mode!r})")
    masks, current = [], mask.float()
    for size in sizes:
        current = (F.interpolate(current, size=size, mode="bilinear", align_corners=True) >= 0.5).float()
        masks.append(current.squeeze(1))
    return masks


def teacher_loss(
    teacher_normal: list[Tensor],
    teacher_anomalous: list[Tensor],
    expert_normal: list[Tensor],
    mask: Tensor,
    expert_anomalous: list[Tensor] | None = None,
    mask_mode: str = "direct",
) -> Tensor:
    """L_TE = L_TE^n + L_TE^a (eq. 2-3), summed over the three scales.

    L_TE^n keeps the teacher close to the expert on normal images (target distance 0);
    L_TE^a asks the distance between T(I_a) and E(I_n) to equal the mask (1 inside the anomaly,
    0 outside). With ``expert_anomalous`` the authors' release term is added: the flattened cosine
    distance between T(I_a) and E(I_a), which keeps the teacher's global response to I_a close to
    the expert's. ``mask_mode``: how M reaches each scale (:func:`teacher_masks`).
    """
    loss = teacher_normal[0].new_zeros((), dtype=torch.float32)
    masks = teacher_masks(mask, [tuple(t.shape[-2:]) for t in teacher_normal], mask_mode)
    for i, (t_n, t_a, e_n, m) in enumerate(zip(teacher_normal, teacher_anomalous, expert_normal, masks)):
        loss = loss + cosine_distance_map(t_n, e_n).mean()
        loss = loss + (cosine_distance_map(t_a, e_n) - m).abs().mean()
        if expert_anomalous is not None:
            loss = loss + flat_cosine_distance(t_a, expert_anomalous[i])
    return loss


def student_loss(
    student_normal: list[Tensor],
    student_anomalous: list[Tensor] | None,
    teacher_normal: list[Tensor],
    expert_normal: list[Tensor] | None = None,
) -> Tensor:
    """L_S = sum_i (L_SE^i + L_ST^i) (eq. 5-6): the student reconstructs the *normal* features of the
    teacher (and of the expert, when there is one) from both I_n and I_a.

    ``student_anomalous=None`` drops the denoising terms (plain RD); ``expert_normal=None`` drops the
    expert targets (RD with denoising only).
    """
    targets = [teacher_normal] if expert_normal is None else [teacher_normal, expert_normal]
    inputs = [student_normal] if student_anomalous is None else [student_normal, student_anomalous]
    loss = student_normal[0].new_zeros((), dtype=torch.float32)
    for target in targets:
        for student in inputs:
            for s, t in zip(student, target):
                loss = loss + flat_cosine_distance(s, t)
    return loss
