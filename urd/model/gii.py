"""Guided Information Injection (GII), Algorithm 1 of the paper's supplement.

GII before student stage S^i takes the teacher features F_T^i (finer) and F_T^{i+1}, and the
student feature F_S^{i+1}, and returns F_SGII^{i+1}, which replaces F_S^{i+1} as the input of S^i:

    1: F_T^i'   = Conv1x1(DownSample(F_T^i))
    2: F_Fuse   = Conv3x3(F_T^i' + F_T^{i+1})
    3: Sim      = cos(F_T^{i+1}, F_S^{i+1})                 per pixel, no gradient
    4: F_SSA    = Conv3x3(F_Fuse * Sim + F_S^{i+1} * (1 - Sim))
    5: F_SGII   = Conv3x3(concat[F_SSA, F_S^{i+1}])

Mode ``skip`` is the "+SC" row of Table 7: no similarity attention, F_SSA = F_Fuse.

Every conv, the Conv1x1 of step 1 included, is a conv (no bias) + BatchNorm + ReLU block: the
paper does not spell the blocks out, and the authors' release builds all of GII's convs this way.
It matters twice. Step 4 mixes F_Fuse and F_S^{i+1} with per-pixel weights, which is only a blend
of like-scaled features when F_Fuse is normalised as F_S is (it leaves a decoder BN-ReLU); with
plain convs the mix turns into a Sim-dependent gain on the injected feature, which ruined the
demo's image AUROC (bench/README.md). And a bare 1x1 conv in
step 1 followed by step 2's conv collapses into one linear map, adding F_T^i' to F_T^{i+1} on
unrelated scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def feature_similarity(teacher: Tensor, student: Tensor) -> Tensor:
    """Per-pixel cosine similarity over channels, B x 1 x H x W, computed without gradient."""
    with torch.no_grad():
        return F.cosine_similarity(teacher.float(), student.float(), dim=1).unsqueeze(1).to(student.dtype)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class GII(nn.Module):
    """``student_channels`` is the width of the decoder feature that GII rewrites (the teacher's
    C_{i+1} unless the student is wider, see :class:`~urd.model.decoder.Decoder`)."""

    def __init__(self, low_channels: int, high_channels: int, gated: bool = True, student_channels: int | None = None) -> None:
        super().__init__()
        width = student_channels or high_channels
        self.down = nn.AvgPool2d(2)
        self.project = conv_bn_relu(low_channels, high_channels, 1)  # step 1
        self.fuse = conv_bn_relu(high_channels, width, 3)  # step 2
        self.attend = conv_bn_relu(width, width, 3) if gated else None  # step 4
        self.merge = conv_bn_relu(2 * width, width, 3)  # step 5

    def forward(self, teacher_low: Tensor, teacher_high: Tensor, student_high: Tensor, student_out: Tensor | None = None) -> Tensor:
        """teacher_low: B x C_i x 2H x 2W; teacher_high: B x C_{i+1} x H x W; student_high: the decoder's
        feature B x C' x H x W; student_out: F_S^{i+1} as compared with the teacher, when the student
        has an output head (else student_high is F_S^{i+1}). -> B x C' x H x W."""
        fused = self.fuse(self.project(self.down(teacher_low)) + teacher_high)
        if self.attend is not None:
            sim = feature_similarity(teacher_high, student_high if student_out is None else student_out)
            injected = self.attend(fused * sim + student_high * (1 - sim))
        else:
            injected = fused
        return self.merge(torch.cat([injected, student_high], dim=1))
