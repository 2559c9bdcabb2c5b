"""Encoder: the first three stages of a torchvision ResNet, returning their three feature maps.

Used as the teacher T (trainable in URD) and, as a frozen copy, as the expert E.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck


class WeightsError(RuntimeError):
    """Backbone weights that cannot be found or loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[..., models.ResNet]
    imagenet: models.WeightsEnum
    block: type[BasicBlock] | type[Bottleneck]
    widths: tuple[int, int, int]  # channels of layer1, layer2, layer3
    decoder_blocks: tuple[int, int, int]  # blocks of student stages S^3, S^2, S^1
    base_width: int  # Bottleneck width per group (128 for the wide nets)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, BasicBlock, (64, 128, 256), (2, 2, 2), 64),
    "resnet34": BackboneSpec(models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1, BasicBlock, (64, 128, 256), (3, 4, 6), 64),
    "resnet50": BackboneSpec(models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, Bottleneck, (256, 512, 1024), (3, 4, 6), 64),
    "wide_resnet50_2": BackboneSpec(
        models.wide_resnet50_2, models.Wide_ResNet50_2_Weights.IMAGENET1K_V1, Bottleneck, (256, 512, 1024), (3, 4, 6), 128
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} (params.yaml model.backbone).") from None


class Encoder(nn.Module):
    """ResNet stem + layer1..layer3. Input B x 3 x H x W -> [B x C1 x H/4, B x C2 x H/8, B x C3 x H/16]."""

    def __init__(self, resnet: models.ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


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
    """Where torchvision looks for the ImageNet weights of ``name`` before downloading them."""
    url = backbone_spec(name).imagenet.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    weights = backbone_spec(name).imagenet
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

    A state dict may be of the whole torchvision ResNet (its fc/layer4 keys are ignored) or of the
    encoder alone; every encoder key must be present with the right shape.
    """
    spec = backbone_spec(name)
    resnet = spec.builder(weights=None)
    if weights == "imagenet":
        state = _imagenet_state_dict(name)
    elif weights == "none":
        state = None
    else:
        state = _file_state_dict(Path(weights))
    encoder = Encoder(resnet)
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
