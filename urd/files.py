"""Files every part of urd writes the same way, and the names of the files a model folder and a bundle hold."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
CALIBRATION_FILE = "calibration.json"  # thresholds and score normalisation, written by urd.calibrate
# An exported bundle (urd.export writes it, urd.inference.OnnxBundle and the Predictor read it).
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
TORCHSCRIPT_FILE = "model.torchscript"
METADATA_FILE = "metadata.json"
CHALLENGE_DIR = "challenge"  # golden samples (urd.challenge): images at the model's size
CHALLENGE_FILE = "challenge.json"  # their recorded scores and decisions per format
# 2: the graph takes RGB in [0, 1] and normalises inside (1 took inputs normalised outside)
BUNDLE_FORMAT = "urd-bundle/2"


def registered_name(dataset: str, category: str) -> str:
    """A category's model in the MLflow Model Registry."""
    return f"urd-{dataset}-{category}"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a hidden file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never half of one, and an interrupted write leaves no
    partial output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
