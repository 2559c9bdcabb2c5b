"""The one lifecycle rule of a model folder: resume an interrupted run, train afresh, or keep an
up-to-date model; and the fingerprints of the params and images a run trained on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from ..checkpoint import load_checkpoint
from ..config import Params
from ..files import MODEL_WEIGHTS


def resume_problem(state: dict[str, Any], checkpoint_path: Path, params_json: str, data: str) -> str | None:
    """Why the checkpoint ``state`` cannot be resumed with these params (``Params.fingerprint``)
    and data (:func:`data_fingerprint`), or None. The one resume-compatibility rule."""
    if state.get("params") != params_json:
        return (f"{checkpoint_path} was written with other params than params.yaml has now; resuming would mix two "
                f"runs. Remove {checkpoint_path.parent} to start over, or restore the params it was trained with.")
    if state.get("data") != data:
        return (f"{checkpoint_path} was written while training on other images (the train/val split changed since); resuming "
                f"would mix two datasets. Remove {checkpoint_path.parent} to start over.")
    return None


@dataclass(frozen=True)
class TrainingPlan:
    """What a run of one category does in its model folder, and why (said to the user)."""

    action: Literal["train", "resume", "up_to_date"]
    reason: str


def plan_training(params: Params, category: str, manifest: pd.DataFrame, out_dir: str | Path) -> TrainingPlan:
    """The one lifecycle rule for a model folder: resume an interrupted run that matches these
    params and images; train afresh when there is no model, when the interrupted run or the
    finished model was made with other params or images (the caller removes a stale
    ``checkpoints/``: a working folder, not a result); else the model is up to date."""
    out_dir = Path(out_dir)
    params_json = params.for_category(category).fingerprint()
    data = data_fingerprint(manifest)
    checkpoint_path = out_dir / "checkpoints" / "last.pt"
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, mmap=True)  # only its fingerprints and iteration are read
        problem = resume_problem(state, checkpoint_path, params_json, data)
        if problem is None:
            total = params.for_category(category).train.iterations
            return TrainingPlan("resume", f"resuming the interrupted run of {category} at iteration {int(state['iteration'])} of {total}")
        return TrainingPlan("train", f"training {category} afresh: the interrupted run cannot be resumed ({problem.split(';')[0]})")
    record = out_dir / "training.json"
    if not (out_dir / MODEL_WEIGHTS).is_file() or not record.is_file():
        return TrainingPlan("train", f"training {category}: {out_dir} holds no trained model yet")
    trained = json.loads(record.read_text())
    if trained.get("data_sha256") != data:
        return TrainingPlan("train", f"retraining {category}: its training images changed since the model in {out_dir} was trained "
                                     f"({trained.get('train_images', '?')} train + {trained.get('val_images', '?')} val then, "
                                     f"{int((manifest['split'] == 'train').sum())} + {int((manifest['split'] == 'val').sum())} now, or their contents)")
    if trained.get("params_sha256") != sha256_text(params_json):
        return TrainingPlan("train", f"retraining {category}: its params changed since the model in {out_dir} was trained")
    return TrainingPlan("up_to_date", f"{category}: the model in {out_dir} was trained on these images with these params")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 over the contents of the images training reads (train and val splits), in order."""
    rows = manifest[manifest["split"].isin(["train", "val"])]
    return hashlib.sha256("\n".join(rows["split"] + ":" + rows["sha256"].astype(str)).encode()).hexdigest()
