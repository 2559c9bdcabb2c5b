"""Where the pipeline keeps things: the one path table, and the params each stage reads.

dvc.yaml names the same paths (tests/test_layout.py checks the two agree). To add a stage: its
body in pipeline/stages.py (and STAGES there), its outputs in :func:`paths`, its params in
STAGE_PARAMS, and the stage in dvc.yaml with precise code deps (tests/test_layout.py checks them).
"""

from __future__ import annotations

from pathlib import Path

from urd.config import RUNTIME_KEYS, Params
from urd.files import CALIBRATION_FILE, MODEL_META, MODEL_WEIGHTS

PARAMS = Path("params.yaml")
DEMO_ROOT = Path("data/raw/demo")
RUN_FILE = "mlflow_run.json"

# Stages of dvc.yaml that belong to no category: they run once, before the per-category ones (with
# fan-out on the orchestrating host, whose push carries their outputs to the workers).
GLOBAL_STAGES = ("demo_data", "textures")

# The params each per-category stage depends on, resolved for the category (base + its override)
# by the `stage_params` stage into data/params/<category>/<stage>.json: dvc.yaml lists those files as the
# stages' dependencies, so an override for one category reruns only that category's stages.
STAGE_PARAMS = {
    "ingest": ["dataset.name", "dataset.root", "dataset.val_fraction", "dataset.exclude"],
    "validate": ["dataset.name", "dataset.min_train_images", "dataset.require_masks"],
    "prepare": ["dataset.name", "dataset.image_size", "synthesis.foreground.{category}"],
    "train": ["seed", "dataset.image_size", "model", "train", "synthesis"],
    "calibrate": ["dataset.name", "dataset.root", "calibrate", "harvest.field_root"],
    "evaluate": ["evaluate"],
    "package": ["package"],
}


def paths(category: str = "") -> dict[str, Path]:
    """Every stage output, in one place (dvc.yaml names the same paths)."""
    return {
        "params": Path("data/params") / category,
        "manifest": Path("data/manifests") / f"{category}.csv",
        "validation": Path("reports/validation") / category,
        "validated": Path("data/validated") / f"{category}.csv",
        "textures": Path("data/prepared/textures.npy"),
        "textures_meta": Path("data/prepared/textures.json"),
        "prepared": Path("data/prepared") / category,
        "model": Path("models") / category,  # the model folder (urd.checkpoint), holding:
        "weights": Path("models") / category / MODEL_WEIGHTS,
        "model_meta": Path("models") / category / MODEL_META,
        "training": Path("models") / category / "training.json",
        "calibration": Path("models") / category / CALIBRATION_FILE,
        "mlflow_run": Path("models") / category / RUN_FILE,
        "metrics": Path("metrics") / f"{category}.json",
        "report": Path("reports") / category,
        "plots": Path("plots") / category,
        "bundle": Path("bundles") / category,
    }


def stage_params(params: Params, category: str, stage: str) -> dict[str, object]:
    """The values of STAGE_PARAMS[stage] for ``category`` (after its override), by dotted key."""
    tree = params.for_category(category).model_dump(mode="json", exclude={"overrides": True, **RUNTIME_KEYS})
    values: dict[str, object] = {}
    for key in STAGE_PARAMS[stage]:
        node: object = tree
        for part in key.format(category=category).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[key.format(category=category)] = node
    return values
