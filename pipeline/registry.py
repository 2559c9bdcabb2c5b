"""Register a category's bundle in the MLflow Model Registry as ``urd-<dataset>-<category>``.

The bundle is logged as a pyfunc model (pipeline/mlflow_model.py, models from code) with a
signature, into the active run; the new version is tagged with its test metrics and lineage and
gets the alias ``candidate``. Promotion to ``production`` is a separate, deliberate step.
"""

from __future__ import annotations

import warnings

import base64
from pathlib import Path
from typing import Any

import pandas as pd

from urd.files import registered_name

CANDIDATE = "candidate"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([
            ColSpec("double", "score"),
            ColSpec("double", "normalized_score"),
            ColSpec("boolean", "is_anomalous"),
            ColSpec("string", "decision"),
            ColSpec(Array(Array("double")), "anomaly_map", required=False),
        ]),
        params=ParamSchema([ParamSpec("return_anomaly_map", "boolean", False)]),
    )


def request_body(images: list[bytes], return_anomaly_map: bool = False) -> dict[str, Any]:
    """The JSON body ``mlflow models serve`` expects for these image files' bytes."""
    body: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode("ascii")] for b in images]}}
    if return_anomaly_map:
        body["params"] = {"return_anomaly_map": True}
    return body


def _requirements() -> list[str]:
    """What the served model imports, pinned to this environment's versions (urd itself must be
    installed where it is served; it is not on PyPI)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in ("torch", "onnxruntime", "opencv-python-headless", "opencv-python", "numpy", "pandas", "safetensors", "pydantic"):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pinned


def register_bundle(bundle_dir: str | Path, dataset: str, category: str, tags: dict[str, str], example_image: str | Path | None = None):
    """Log the bundle as a pyfunc model in the active MLflow run, register it, tag the version
    and point the ``candidate`` alias at it. Returns the ModelVersion."""
    import mlflow
    from mlflow import MlflowClient

    name = registered_name(dataset, category)
    example = pd.DataFrame({"image": [Path(example_image).read_bytes()]}) if example_image else None
    with warnings.catch_warnings():
        # The signature is given explicitly, so MLflow's advice to infer it from type hints is noise in the stage's log.
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"bundle": str(bundle_dir)},
            signature=signature(),
            input_example=example,
            pip_requirements=_requirements(),
            registered_model_name=name,
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, CANDIDATE, version)
    return client.get_model_version(name, version)
