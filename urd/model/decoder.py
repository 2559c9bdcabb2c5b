"""Student decoder: the encoder's ResNet stages mirrored, upsampling with 2x2 stride-2 transposed convs.

Stage S^3 turns the OCBE embedding (H/32) into F_S^3 (H/16), S^2 gives F_S^2 (H/8), S^1 gives F_S^1
(H/4); their widths match the teacher's layer3, layer2, layer1. GII modules (mode ``skip`` or
``gii``) sit before S^2 and S^1 and feed them the teacher-informed feature instead of F_S^{i+1}.

Output heads (a 1x1 conv with bias, no activation, per scale) turn each stage's output into F_S^i
when the stage cannot be compared with the teacher as it is: when the teacher's features are
signed (EfficientNet blocks end in a linear projection, about half their values are negative,
while a decoder stage ends in a ReLU, so the cosine to the teacher could never reach 1), or when
the stages are wider than the teacher's (``width`` > 1). A ResNet student of width 1 has none, as
in RD.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

from .gii import GII


def deconv2x2(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)


class DeBasicBlock(nn.Module):
    """BasicBlock whose first conv upsamples 2x (transposed conv) when stride is 2."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = deconv2x2(inplanes, planes) if stride == 2 else conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DeBottleneck(nn.Module):
    """Bottleneck whose 3x3 conv upsamples 2x (transposed conv) when stride is 2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * base_width / 64)
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = deconv2x2(width, width) if stride == 2 else conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


DECODER_BLOCKS: dict[type[nn.Module], type[DeBasicBlock] | type[DeBottleneck]] = {
    BasicBlock: DeBasicBlock,
    Bottleneck: DeBottleneck,
}


def decoder_stage(block: type[DeBasicBlock] | type[DeBottleneck], inplanes: int, planes: int, num_blocks: int, base_width: int) -> nn.Sequential:
    """One mirrored ResNet stage, upsampling 2x in its first block (and on that block's shortcut)."""
    out_channels = planes * block.expansion
    upsample = nn.Sequential(deconv2x2(inplanes, out_channels), nn.BatchNorm2d(out_channels))
    kwargs = {"base_width": base_width} if block is DeBottleneck else {}
    layers: list[nn.Module] = [block(inplanes, planes, stride=2, upsample=upsample, **kwargs)]
    layers += [block(out_channels, planes, **kwargs) for _ in range(num_blocks - 1)]
    return nn.Sequential(*layers)


def output_head(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)


class Decoder(nn.Module):
    def __init__(
        self,
        encoder_block: type[BasicBlock] | type[Bottleneck],
        widths: tuple[int, int, int],
        num_blocks: tuple[int, int, int],
        gii: str = "gii",
        base_width: int = 64,
        width: int = 1,
        heads: bool = False,
    ) -> None:
        """``widths``: the teacher's C1, C2, C3; the stages are ``width`` times as wide; ``heads``
        adds the output heads (forced when ``width`` > 1)."""
        super().__init__()
        if gii not in ("none", "skip", "gii"):
            raise ValueError(f"gii must be 'none', 'skip' or 'gii' (got {gii!r})")
        if width < 1:
            raise ValueError(f"width must be >= 1 (got {width})")
        block = DECODER_BLOCKS[encoder_block]
        c1, c2, c3 = widths
        w1, w2, w3 = (width * c for c in widths)
        e = block.expansion  # planes = stage width / expansion
        self.stage3 = decoder_stage(block, 2 * w3, w3 // e, num_blocks[0], base_width)  # OCBE 2*W3 x H/32 -> W3 x H/16
        self.stage2 = decoder_stage(block, w3, w2 // e, num_blocks[1], base_width)  # -> W2 x H/8
        self.stage1 = decoder_stage(block, w2, w1 // e, num_blocks[2], base_width)  # -> W1 x H/4
        if gii == "none":
            self.gii2 = self.gii1 = None
        else:
            self.gii2 = GII(c2, c3, gated=gii == "gii", student_channels=w3)  # before S^2
            self.gii1 = GII(c1, c2, gated=gii == "gii", student_channels=w2)  # before S^1
        self.heads = None
        if heads or width > 1:
            self.heads = nn.ModuleList([output_head(w1, c1), output_head(w2, c2), output_head(w3, c3)])

    def _out(self, scale: int, feature: Tensor) -> Tensor:
        return feature if self.heads is None else self.heads[scale](feature)

    def forward(self, embedding: Tensor, teacher: list[Tensor]) -> list[Tensor]:
        """embedding: OCBE output; teacher: [F_T^1, F_T^2, F_T^3] (used by GII only) -> [F_S^1, F_S^2, F_S^3]."""
        h3 = self.stage3(embedding)
        s3 = self._out(2, h3)
        h2 = self.stage2(h3 if self.gii2 is None else self.gii2(teacher[1], teacher[2], h3, s3))
        s2 = self._out(1, h2)
        h1 = self.stage1(h2 if self.gii1 is None else self.gii1(teacher[0], teacher[1], h2, s2))
        return [self._out(0, h1), s2, s3]
