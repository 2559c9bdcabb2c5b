"""MLflow tracking for the pipeline stages.

* Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a shared server, a Databricks workspace...),
  otherwise ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts`` (absolute
  paths, so the stages, ``mlflow ui`` and ``mlflow models serve`` agree wherever they run from).
* One experiment per dataset (``urd-<dataset>``); one run per category per pipeline execution;
  promotion decisions in the experiment ``promotion`` (pipeline/promotion.py).
  The train stage opens it and writes its id to ``models/<category>/mlflow_run.json`` (a train
  output), which calibrate, evaluate and package read to log into the same run.
* Lineage tags: git commit and dirty flag, DVC hashes of the category's raw data and manifest
  (from dvc.lock), dataset, category, backbone and its weights source.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from urd.config import Params

from .layout import paths

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def repo_root(start: str | Path | None = None) -> Path:
    """The folder holding dvc.yaml at or above ``start`` (the stages run from the repo root)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def tracking_uri(root: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(root) / DB_FILE}"


def configure(root: str | Path | None = None) -> str:
    """Point MLflow (tracking and registry) at :func:`tracking_uri`; returns the URI."""
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def experiment_id(name: str, root: str | Path | None = None) -> str:
    """The experiment ``name``, created on first use (artifacts beside the SQLite file by default).

    Safe when several processes start at once (fan-out children training two categories on one
    server): the one that loses the race to create it reads the winner's."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (repo_root(root) / ARTIFACTS_DIR / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        found = client.get_experiment_by_name(name)
        if found is None or "ALREADY_EXISTS" not in str(exc.error_code) + str(exc):
            raise
        return found.experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1}} -> {"train.lr": "1"} (lists and None as JSON-ish text)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple, dict)) or value is None else str(value)
    return out


def git_state(root: Path) -> dict[str, str]:
    from .process import StageFailed
    from .workspace import git as run_git

    def git(*args: str) -> str:
        try:
            return run_git(root, *args).strip()
        except (StageFailed, OSError):  # not a git checkout, or no git: "unknown"
            return ""

    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower() if commit else "unknown"}


def dvc_hashes(root: Path, params: Params, category: str) -> dict[str, str]:
    """md5 hashes DVC recorded in dvc.lock for the category's raw data folder and manifest."""
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else {}
    stage = (lock or {}).get("stages", {}).get(f"ingest@{category}", {})
    data_path = f"{params.for_category(category).dataset.root.rstrip('/')}/{category}"
    found = {"dvc_data_md5": "unknown", "dvc_manifest_md5": "unknown"}
    for dep in stage.get("deps", []):
        if dep.get("path", "").rstrip("/") == data_path:
            found["dvc_data_md5"] = dep.get("md5", "unknown")
    for out in stage.get("outs", []):
        if out.get("path") == paths(category)["manifest"].as_posix():
            found["dvc_manifest_md5"] = out.get("md5", "unknown")
    return found


def lineage_tags(params: Params, category: str, root: str | Path | None = None) -> dict[str, str]:
    root = repo_root(root)
    p = params.for_category(category)
    return {
        "dataset": p.dataset.name,
        "category": category,
        "backbone": p.model.backbone,
        "weights_source": p.model.weights,
        **git_state(root),
        **dvc_hashes(root, params, category),
    }


def start_category_run(params: Params, category: str, run_file: str | Path, resume: bool = False) -> str:
    """Open this pipeline execution's run for ``category`` (reused when training resumes) and log
    params and lineage; writes the run id to ``run_file`` and returns it."""
    import mlflow

    configure()
    run_file = Path(run_file)
    if resume and run_file.is_file():
        return json.loads(run_file.read_text())["run_id"]
    end_leftover_run(run_file, "the train stage started over")
    p = params.for_category(category)
    tags = lineage_tags(params, category)
    with mlflow.start_run(experiment_id=experiment_id(f"urd-{p.dataset.name}"), run_name=f"{category}", tags=tags) as run:
        mlflow.log_params(flatten(p.model_dump(exclude={"overrides"})))
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": tracking_uri()}, indent=2) + "\n")
    return run.info.run_id


def end_leftover_run(run_file: str | Path, why: str) -> str | None:
    """End the MLflow run named by ``run_file`` as KILLED when it is still RUNNING: its stage was
    interrupted (a killed process, a lost worker) and is being started over or replaced, so nothing
    will ever finish it. Returns the run id it ended, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_file = Path(run_file)
    if not run_file.is_file():
        return None
    try:
        run_id = json.loads(run_file.read_text())["run_id"]
        configure()
        client = MlflowClient()
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_tag(run_id, "urd.ended", f"interrupted; {why}")
        client.set_terminated(run_id, status="KILLED")
        return run_id
    except (MlflowException, ValueError, KeyError):
        return None  # a run of another server or a damaged file: nothing this checkout can end


@contextmanager
def category_run(run_file: str | Path) -> Iterator[Any]:
    """Log into the run named by ``run_file`` (written by the train stage)."""
    import mlflow

    run_file = Path(run_file)
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_file} is missing: it is written by the train stage. Run `dvc repro` (or the train stage) first.")
    configure()
    with mlflow.start_run(run_id=json.loads(run_file.read_text())["run_id"]) as run:
        yield run


def metric_key(name: str) -> str:
    """MLflow metric names allow alphanumerics, _ - . space : / only."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


def log_evaluation(metrics: dict[str, Any]) -> None:
    """Overall metrics as ``test_<metric>``, per defect type as ``test/<defect>/<metric>``."""
    import mlflow

    values = {f"test_{k}": float(v) for k, v in metrics["overall"].items() if isinstance(v, (int, float))}
    for defect, entry in metrics["per_defect_type"].items():
        values |= {metric_key(f"test/{defect}/{k}"): float(v) for k, v in entry.items() if isinstance(v, (int, float)) and k != "images"}
    for key in ("at_calibrated_threshold", "at_calibrated_pixel_threshold"):
        if key in metrics:
            values |= {f"test_{key}/{k}": float(v) for k, v in metrics[key].items() if isinstance(v, (int, float))}
    mlflow.log_metrics(values)
