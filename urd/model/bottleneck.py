"""OCBE bottleneck of Reverse Distillation: Multi-scale Feature Fusion (MFF) + One-Class Embedding (OCE)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1


def conv3x3_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MFF(nn.Module):
    """Brings layer1 and layer2 features to the layer3 grid and concatenates: -> B x 3*C3 x H/16."""

    def __init__(self, widths: tuple[int, int, int]) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.down1 = nn.Sequential(conv3x3_bn_relu(c1, c2, stride=2), conv3x3_bn_relu(c2, c3, stride=2))
        self.down2 = conv3x3_bn_relu(c2, c3, stride=2)

    def forward(self, features: list[Tensor]) -> Tensor:
        f1, f2, f3 = features
        return torch.cat([self.down1(f1), self.down2(f2), f3], dim=1)


class OCE(nn.Module):
    """One ResNet stage at stride 2 over the fused features: B x 3*C3 x H/16 -> B x 2*C3 x H/32
    (512 for resnet18, 2048 for the 50-layer nets, as in RD)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: int,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        planes = out_channels // block.expansion
        downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride=2), nn.BatchNorm2d(out_channels))
        kwargs = {"base_width": base_width} if block is Bottleneck else {}
        layers: list[nn.Module] = [block(in_channels, planes, stride=2, downsample=downsample, **kwargs)]
        layers += [block(out_channels, planes, **kwargs) for _ in range(num_blocks - 1)]
        self.layers = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class OCBE(nn.Module):
    """[F^1, F^2, F^3] of the teacher -> compact embedding (512x8x8 for resnet18, 2048x8x8 for wide_resnet50_2 at 256);
    ``width`` times as wide for a wider student."""

    def __init__(self, widths: tuple[int, int, int], block: type[BasicBlock] | type[Bottleneck], base_width: int = 64, width: int = 1) -> None:
        super().__init__()
        self.mff = MFF(widths)
        num_blocks = 3 if block is Bottleneck else 2
        self.oce = OCE(3 * widths[2], 2 * width * widths[2], block, num_blocks, base_width)
        self.out_channels = self.oce.out_channels

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.oce(self.mff(features))
