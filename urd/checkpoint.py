"""Files a trained model lives in, and training checkpoints. Nothing here unpickles code.

* A trained model is a folder with ``model.safetensors`` (teacher + student weights, no expert)
  and ``model.json`` (architecture, input size, preprocessing, training summary).
* A training checkpoint (``checkpoints/last.pt``) holds model and optimiser states, RNG states and
  the iteration; it is written to a temporary file and renamed, and read with weights_only=True.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import Params
from .data.images import RESIZE_METHOD
from .files import MODEL_META, MODEL_WEIGHTS, atomic_write, atomic_write_text
from .model.backbone import backbone_spec
from .model.urd import URD, InferenceGraph

# 2: the graph takes RGB in [0, 1] and normalises inside (1 took inputs normalised outside)
MODEL_FORMAT = "urd-model/2"


class ModelFileError(FileNotFoundError):
    """A model folder that is missing a file or does not match its metadata."""


def build_model(params: Params) -> URD:
    """The network ``params`` describe (model section, input size), with its backbone weights."""
    m = params.model
    return URD(m.backbone, m.weights, m.expert, m.gii, params.dataset.image_size, m.blur_sigma, m.teacher_batchnorm, m.student_width,
               m.blur_border)


def model_meta(params: Params, category: str) -> dict[str, Any]:
    m = params.model
    return {
        "format": MODEL_FORMAT,
        "urd_version": __version__,
        "category": category,
        "dataset": params.dataset.name,
        "architecture": {
            "backbone": m.backbone,
            "gii": m.gii,
            "student_width": m.student_width,
            "expert_in_training": m.expert,
            "blur_sigma": m.blur_sigma,
            "blur_border": m.blur_border,
        },
        "weights_source": m.weights,
        "preprocessing": {
            "image_size": params.dataset.image_size,
            "resize": RESIZE_METHOD,
            "color": "RGB",
            "scale": "1/255",
            # the backbone's normalisation, applied inside the model (its first step): inputs are RGB in [0, 1]
            "mean": list(backbone_spec(m.backbone).mean),
            "std": list(backbone_spec(m.backbone).std),
            "normalisation": "in the model",
        },
    }


def save_model(model: URD, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the inference weights and metadata of ``model`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.inference_graph().state_dict().items()}
    atomic_write(out_dir / MODEL_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(out_dir / MODEL_META, json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_META
    if not path.is_file():
        raise ModelFileError(f"{path} not found: {model_dir} is not a trained urd model folder (run `urd train` first).")
    return json.loads(path.read_text())


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[InferenceGraph, dict[str, Any]]:
    """The inference graph (eval mode) and metadata of a trained model folder."""
    meta = read_meta(model_dir)
    if meta.get("format") != MODEL_FORMAT:
        raise ModelFileError(
            f"{Path(model_dir) / MODEL_META} is format {meta.get('format')!r}, written by an older urd whose models took inputs "
            f"normalised outside the model; this urd reads {MODEL_FORMAT!r}. Retrain the model (`urd train` or `dvc repro`)."
        )
    weights = Path(model_dir) / MODEL_WEIGHTS
    if not weights.is_file():
        raise ModelFileError(f"{weights} not found; the model folder is incomplete. Retrain or copy the whole folder.")
    arch = meta["architecture"]
    model = URD(arch["backbone"], "none", expert=False, gii=arch["gii"], image_size=meta["preprocessing"]["image_size"],
                blur_sigma=arch["blur_sigma"], student_width=arch.get("student_width", 1), blur_border=arch.get("blur_border", "mirror"))
    graph = model.inference_graph()
    try:
        graph.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ModelFileError(f"{weights} does not match the architecture in {MODEL_META}: {str(exc)[:300]}") from None
    return graph.to(device).eval(), meta


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A training checkpoint; ``mmap``: its tensors are mapped, not read, until used (for a look at
    its iteration and fingerprints before deciding whether to resume)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
