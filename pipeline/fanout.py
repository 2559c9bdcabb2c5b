"""Fan-out over work-pool workers: each changed category built by a ``train-category`` flow run in a
checkout of its own on another host, and merged back into the orchestrating checkout.

Children see only the git commit and the DVC remote: the parent checks that each category's inputs
can travel (pipeline/workspace.py:travel_problems), pushes, starts one ``train-category`` run per
category (``run_deployment``), and merges the ``dvc.lock`` entries each hands back as a table
artifact, all or nothing per category (pipeline/workspace.py:merge_category).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from urd.config import Params, load_params

from . import tracking
from .layout import paths
from .process import StageFailed
from .workspace import data_pointers, dvc, git, merge_category, stage_category, stage_env, stages_ran, travel_problems

LOCK_ARTIFACT = "dvc-lock"
GPU_LIMIT = "gpu"


def fan_out(root: Path, results: dict[str, Any], params: Params, repo: str | None, lock_wait_s: float) -> None:
    """One ``train-category`` flow run per category on the work pool; merge what each hands back.

    Before anything is started: the shared MLflow server and the DVC remote must be configured,
    the global stages (the generated demo, textures) run here and their cached outputs travel
    through the remote, and each category's inputs must be able to reach a worker
    (:func:`travel_problems`); a category whose inputs cannot fails here, by name, with the fix."""
    logger = get_run_logger()
    uri = tracking.tracking_uri(root)
    if not uri.startswith(("http://", "https://", "databricks")):
        raise RuntimeError(f"fan-out needs a shared MLflow server (children on other hosts log there); MLFLOW_TRACKING_URI is {uri}. "
                           "Start `mlflow server` and export MLFLOW_TRACKING_URI=http://<host>:<port> for the parent and the workers.")
    if not dvc(root, "remote", "default", log=lambda line: None, lock_wait_s=lock_wait_s).strip():
        raise RuntimeError("fan-out children hand their outputs back through a DVC remote, and this repository has no default one: "
                           "`dvc remote add -d storage <shared folder, s3://..., ssh://...>` and commit .dvc/config.")
    commit = git(root, "rev-parse", "HEAD")
    repo = repo or str(root)
    # The parent ran the global stages itself (retrain): its checkout holds their cached outputs
    # (an edited demo image is versioned in the DVC cache), and the push below carries them.
    for category, found in travel_problems(root, list(results)).items():
        results[category].error = f"cannot be built on a worker, so it was not started: {'; '.join(found)}"
        logger.error(f"{category}: {results[category].error}")
    go = [c for c, r in results.items() if not r.error]
    if not go:
        return
    pointers = data_pointers(root)
    logger.info("pushing to the DVC remote: the pipeline's cached outputs" + (f" and the data of {', '.join(pointers)}" if pointers else ""))
    dvc(root, "push", log=logger.info, lock_wait_s=lock_wait_s)
    lock_file = root / "dvc.lock"
    lock_text = lock_file.read_text() if lock_file.is_file() else None
    futures = {c: child_run.submit(c, repo, commit, uri, lock_text) for c in go}
    for category, future in futures.items():
        future.wait()
        state = future.state
        if state.is_failed():
            results[category].error = error_text(state)
            continue
        entries, results[category].ran, version = state.result()
        try:
            merge_category(root, category, entries, logger.info, lock_wait_s,
                           before_checkout=lambda c=category: tracking.end_leftover_run(root / paths(c)["mlflow_run"], "replaced by a fan-out child's run"))
        except StageFailed as exc:
            results[category].error = str(exc)
            if version:
                from .promotion import mark_unmerged

                mark_unmerged(params, category, version, str(exc))


@task(name="fan-out-child")
def child_run(category: str, repo: str, commit: str, tracking_uri: str, lock: str | None) -> tuple[dict[str, Any], list[str], str | None]:
    """Run the ``train-category`` deployment for ``category``; its lock entries, the stages it ran
    and the model version it registered (None when it registered none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.deployments import run_deployment

    run = run_deployment("train-category/train-category", parameters={"category": category, "repo": repo, "commit": commit,
                                                                      "tracking_uri": tracking_uri, "lock": lock}, poll_interval=2)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"train-category for {category} ended {run.state.name if run.state else 'unknown'}: {run.state.message if run.state else ''} "
                           f"(flow run {run.name}, see its logs in the Prefect UI)")
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{LOCK_ARTIFACT}-{category}"]),
                                                                     flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    if not found:
        raise RuntimeError(f"train-category for {category} completed without its {LOCK_ARTIFACT} artifact (flow run {run.name})")
    data = found[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    entries = {row["stage"]: json.loads(row["lock"]) for row in rows}
    return entries, [row["stage"] for row in rows if row.get("ran")], next((row["version"] for row in rows if row.get("version")), None)


def _needs_gpu(params: Params, category: str) -> bool:
    import torch

    return params.for_category(category).train.device in ("auto", "cuda") and torch.cuda.is_available()


@flow(name="train-category", log_prints=True)
def build_category(category: str, repo: str, commit: str, tracking_uri: str, lock: str | None = None, workdir: str | None = None,
                   keep_checkout: bool = False) -> dict[str, Any]:
    """One category's stages in a checkout of its own (for fan-out): clone ``repo`` at ``commit``,
    take the parent's ``dvc.lock`` (``lock``, its text) and pull what the DVC remote has of it, so
    only what changed runs; `dvc repro package@<category>` (holding a slot of the ``gpu``
    global concurrency limit when it trains on a GPU), push the outputs, and hand back the
    category's dvc.lock entries as the table artifact ``dvc-lock-<category>``."""
    from prefect.artifacts import create_table_artifact
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    base = Path(workdir or tempfile.gettempdir()) / f"urd-{category}-{commit[:12]}-{os.getpid()}-{time.time_ns()}"
    git(Path(tempfile.gettempdir()), "clone", "--quiet", repo, str(base))
    try:
        git(base, "checkout", "--quiet", commit)
        if lock:
            (base / "dvc.lock").write_text(lock)
        env = stage_env() | {"MLFLOW_TRACKING_URI": tracking_uri}
        dvc(base, "pull", "--allow-missing", env=env, log=logger.info)
        params = load_params(base / "params.yaml")
        timeout_s = params.for_category(category).retrain.stage_timeout_minutes * 60
        with concurrency(GPU_LIMIT, occupy=1) if _needs_gpu(params, category) else nullcontext():
            output = dvc(base, "repro", f"package@{category}", env=env, log=logger.info, timeout_s=timeout_s)
        dvc(base, "push", env=env, log=logger.info)
        lock = yaml.safe_load((base / "dvc.lock").read_text())["stages"]
        ran = set(stages_ran(output))
        registered = re.search(r"registered \S+ version (\d+) as @candidate", output)
        version = registered.group(1) if registered else ""
        mine = {name: entry for name, entry in lock.items() if stage_category(name) == category}
        create_table_artifact([{"stage": name, "ran": name in ran, "version": version, "lock": json.dumps(entry)} for name, entry in mine.items()],
                              key=f"{LOCK_ARTIFACT}-{category}", description=f"dvc.lock entries of {category} at {commit[:12]}")
        return {"ran": sorted(ran), "stages": sorted(mine), "version": version or None}
    finally:
        if not keep_checkout:
            shutil.rmtree(base, ignore_errors=True)


def error_text(state) -> str:
    """Why a Prefect task or flow run failed: its own exception's message, else the state's."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        return str(exc)
    return state.message or "failed"
