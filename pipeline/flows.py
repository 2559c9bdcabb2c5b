"""Prefect flows: unattended retraining, the promotion gate after it, and fan-out over workers.

* ``retrain``: ``dvc status`` -> the categories whose data, params or code changed -> their DVC
  stages (``dvc repro package@<category>``, one Prefect task per category, output streamed to the
  run's logger, retried only after transient failures, killed with its whole process group at the
  timeout) -> the promotion gate per category -> a markdown artifact ``retrain-report``. A category
  that fails (bad data, a crash) fails alone: the others still finish and are gated, and the flow
  run ends Failed. Nothing changed: a short run that says so and promotes nothing.
* ``fan_out=True``: each changed category runs as a ``train-category`` deployment on a work pool
  (``run_deployment``), in its own checkout (DVC locks a working copy while it runs): git commit +
  DVC remote in, outputs pushed to the DVC remote, MLflow to the shared server, and the
  ``dvc.lock`` entries of its stages handed back as a table artifact. The parent merges those
  entries and pulls the outputs, so its checkout reads as up to date (``dvc status`` clean).
* ``serve_retrain``: ``retrain`` served as ``retrain/served`` on the cron of ``params.retrain`` (one host).
  Several hosts: ``prefect.yaml`` (deployments on a ``process`` work pool).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from prefect import flow, get_run_logger, task

from urd.config import Params, load_params

from . import tracking
from .stages import paths

GLOBAL_STAGES = ("demo_data", "textures")
LOCK_ARTIFACT = "dvc-lock"
REPORT_ARTIFACT = "retrain-report"
GPU_LIMIT = "gpu"
# Output of a failed command that says "try again later", not "this will fail again": another
# DVC process holds the lock, the MLflow server or a remote is briefly unreachable, SQLite busy.
TRANSIENT = re.compile(
    r"Unable to acquire lock|is locked by|database is locked|Connection refused|ConnectionError|Max retries exceeded|"
    r"Temporary failure in name resolution|Service Unavailable|\b50[234]\b|Read timed out|RemoteDisconnected",
    re.IGNORECASE,
)


class StageFailed(RuntimeError):
    """A command failed; ``transient`` says whether running it again may help."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def run_logged(cmd: list[str], cwd: str | Path, timeout_s: float | None = None, env: dict[str, str] | None = None,
               log: Callable[[str], None] = print) -> str:
    """Run ``cmd`` in its own process group, each output line to ``log``; returns the output.

    At ``timeout_s`` the whole group (DVC and the stage it started) gets SIGTERM, then SIGKILL
    after 10 s: a timeout that only stopped waiting would leave training running behind it.
    Raises StageFailed (``transient`` when the output looks like a lock or network hiccup)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(5)
        raise StageFailed(f"`{' '.join(cmd)}` ran past its timeout of {timeout_s:.0f} s (retrain.stage_timeout_minutes) and was killed "
                          "with its process group") from None
    reader.join(30)
    output = "".join(lines)
    if proc.returncode != 0:
        raise StageFailed(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {failure_summary(output)}", transient=bool(TRANSIENT.search(output)))
    return output


def failure_summary(output: str) -> str:
    """The lines of a failed run a person needs: the stage's own error paragraph (`error in ...`
    and its indented details) and DVC's verdict; else the last lines."""
    lines = output.strip().splitlines()
    keep, inside = [], False
    for line in lines:
        if line.startswith("error in "):
            inside = True
        elif inside and not line.startswith(("  ", "Nothing downstream")):
            inside = False
        if inside or line.startswith("ERROR:"):
            keep.append(line.strip())
    return " ".join(keep[:12]) if keep else " ".join(line.strip() for line in lines[-5:])


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _stage_env() -> dict[str, str]:
    """Stage commands call `python -m pipeline`: this interpreter's, first on PATH."""
    return os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def stage_category(stage: str) -> str | None:
    """'train@widget' -> 'widget'; global stages -> None."""
    return stage.split("@", 1)[1] if "@" in stage else None


def changed_categories(root: Path, categories: list[str]) -> dict[str, list[str]]:
    """{category: its stages `dvc status` reports as changed}; a changed global stage (demo data,
    textures) puts every category in."""
    output = subprocess.run(_dvc("status", "--json"), cwd=root, capture_output=True, text=True, env=_stage_env())
    if output.returncode != 0:
        raise StageFailed(f"`dvc status` failed in {root}:\n{output.stdout}{output.stderr}")
    status = json.loads(output.stdout.strip().splitlines()[-1] or "{}") if output.stdout.strip() else {}
    changed: dict[str, list[str]] = {}
    global_changed = [s for s in status if stage_category(s) is None and s.split(":")[-1] in GLOBAL_STAGES]
    for category in categories:
        own = [s for s in status if stage_category(s) == category]
        if own or global_changed:
            changed[category] = global_changed + own
    return changed


def stages_ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only failures that may pass on a second try."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except Exception:
        return False
    return False


@task(name="dvc-repro", retry_condition_fn=_retry_transient)
def repro_category(root: str, category: str, timeout_s: float) -> list[str]:
    """`dvc repro package@<category>`: the category's stages that need it (and global ones)."""
    logger = get_run_logger()
    output = run_logged(_dvc("repro", f"package@{category}"), root, timeout_s, env=_stage_env(), log=logger.info)
    return stages_ran(output)


@task(name="promotion-gate")
def gate_category(root: str, category: str) -> dict[str, Any]:
    from .promotion import promote

    decision = promote(load_params(Path(root) / "params.yaml"), category, root)
    get_run_logger().info(decision.summary())
    return asdict(decision)


@dataclass
class CategoryResult:
    category: str
    ran: list[str] = field(default_factory=list)
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    mlflow_run: str = ""


def _run_link(run_file: Path) -> str:
    if not run_file.is_file():
        return "-"
    run = json.loads(run_file.read_text())
    uri = run.get("tracking_uri", "")
    if uri.startswith("http"):
        return f"[{run['run_id'][:8]}]({uri.rstrip('/')}/#/experiments/{run['experiment_id']}/runs/{run['run_id']})"
    return f"`{run['run_id'][:8]}` in `{uri}`"


def report_markdown(results: list[CategoryResult], root: Path, nothing_changed: bool, promote: bool, fan_out: bool) -> str:
    """The ``retrain-report`` artifact: per category what ran, metrics, decision and why, links."""
    if nothing_changed:
        return "# Retrain: nothing changed\n\n`dvc status` reports no change in data, params or code: nothing ran, nothing was promoted.\n"
    lines = [f"# Retrain: {sum(not r.error for r in results)} of {len(results)} categories rebuilt" + (" (fan-out)" if fan_out else ""), "",
             "| category | stages run | result | I-AUROC | P-AUROC | AUPRO | decision | why | model card | MLflow run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.metrics
        fmt = lambda k: f"{100 * m[k]:.1f}" if k in m else "-"  # noqa: E731
        decision = r.gate.get("decision", "not gated" if not promote else "-")
        why = r.gate.get("reason", "") if r.gate else r.error
        card = paths(r.category)["bundle"] / "model_card.md"
        lines.append(f"| {r.category} | {len(r.ran)} ({', '.join(s.split('@')[0] for s in r.ran) or 'none'}) | {'FAILED' if r.error else 'ok'} | "
                     f"{fmt('image_auroc')} | {fmt('pixel_auroc')} | {fmt('pixel_aupro')} | **{decision}** | {why.replace('|', '/').replace(chr(10), ' ')} | "
                     f"{'`' + str(card) + '`' if (root / card).is_file() and not r.error else '-'} | {r.mlflow_run or '-'} |")
    return "\n".join(lines) + "\n"


def _collect(root: Path, result: CategoryResult) -> None:
    metrics_file = root / paths(result.category)["metrics"]
    if metrics_file.is_file():
        result.metrics = {k: v for k, v in json.loads(metrics_file.read_text()).items() if isinstance(v, (int, float))}
    result.mlflow_run = _run_link(root / paths(result.category)["mlflow_run"])


@flow(name="retrain", log_prints=True)
def retrain(categories: list[str] | None = None, promote: bool = True, fan_out: bool = False, root: str = ".",
            repo: str | None = None) -> dict[str, Any]:
    """Rebuild what changed, gate each rebuilt category, report; see the module doc."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    wanted = categories or params.dataset.categories
    for category in wanted:
        params.for_category(category)  # an unknown category fails the run here, with the fix
    changed = changed_categories(root_path, wanted)
    if not changed:
        logger.info("nothing changed (dvc status): nothing to run, nothing to promote")
        create_markdown_artifact(report_markdown([], root_path, True, promote, fan_out), key=REPORT_ARTIFACT, description="retrain: nothing changed")
        return {"changed": [], "failed": []}
    results = {c: CategoryResult(c) for c in changed}
    if fan_out:
        _fan_out(root_path, results, params, repo)
    else:
        for category, result in results.items():
            rp = params.for_category(category).retrain
            state = repro_category.with_options(retries=rp.retries, retry_delay_seconds=rp.retry_delay_seconds)(
                str(root_path), category, rp.stage_timeout_minutes * 60, return_state=True)
            if state.is_failed():
                result.error = _error_text(state)
            else:
                result.ran = state.result()
    for result in results.values():
        if result.error:
            continue  # its metrics and MLflow run on disk are an earlier run's: the report shows none
        _collect(root_path, result)
        if promote:
            state = gate_category(str(root_path), result.category, return_state=True)
            if state.is_failed():
                result.error = "promotion gate failed: " + _error_text(state)
            else:
                result.gate = state.result()
    markdown = report_markdown(list(results.values()), root_path, False, promote, fan_out)
    create_markdown_artifact(markdown, key=REPORT_ARTIFACT, description=f"retrain of {', '.join(results)}")
    failed = [c for c, r in results.items() if r.error]
    if failed:
        raise RuntimeError(f"retrain failed for {', '.join(failed)} (the other categories finished and were gated; see the retrain-report artifact)")
    return {"changed": list(results), "failed": [], "decisions": {c: r.gate.get("decision") for c, r in results.items()}}


def _error_text(state) -> str:
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        return str(exc)
    return state.message or "failed"


# ---------------------------------------------------------------- fan-out over work-pool workers


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise StageFailed(f"`git {' '.join(args)}` failed in {root}: {result.stderr.strip()}")
    return result.stdout.strip()


def _fan_out(root: Path, results: dict[str, CategoryResult], params: Params, repo: str | None) -> None:
    """One ``train-category`` flow run per category on the work pool; merge their lock entries."""
    logger = get_run_logger()
    uri = tracking.tracking_uri(root)
    if not uri.startswith(("http://", "https://", "databricks")):
        raise RuntimeError(f"fan-out needs a shared MLflow server (children on other hosts log there); MLFLOW_TRACKING_URI is {uri}. "
                           "Start `mlflow server` and export MLFLOW_TRACKING_URI=http://<host>:<port> for the parent and the workers.")
    if _git(root, "status", "--porcelain", "--untracked-files=no", "--", "params.yaml", "dvc.yaml", "urd", "pipeline"):
        raise RuntimeError("fan-out children check out a git commit, but params.yaml, dvc.yaml or the code has uncommitted changes here: "
                           "commit them first (git commit -am ...) so every worker trains what this checkout has.")
    if not subprocess.run(_dvc("remote", "default"), cwd=root, capture_output=True, text=True, env=_stage_env()).stdout.strip():
        raise RuntimeError("fan-out children hand their outputs back through a DVC remote, and this repository has no default one: "
                           "`dvc remote add -d storage <shared folder, s3://..., ssh://...>` and commit .dvc/config.")
    commit = _git(root, "rev-parse", "HEAD")
    repo = repo or str(root)
    # The parent runs the global stages itself (its checkout must hold their outputs) and pushes,
    # so children can pull instead of recomputing.
    run_logged(_dvc("repro", *GLOBAL_STAGES), root, env=_stage_env(), log=logger.info)
    run_logged(_dvc("push"), root, env=_stage_env(), log=logger.info)
    lock_file = root / "dvc.lock"
    lock_text = lock_file.read_text() if lock_file.is_file() else None
    futures = {c: child_run.submit(c, repo, commit, uri, lock_text) for c in results}
    for category, future in futures.items():
        future.wait()
        state = future.state
        if state.is_failed():
            results[category].error = _error_text(state)
            continue
        entries, results[category].ran = state.result()
        lock = yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else {"schema": "2.0", "stages": {}}
        lock.setdefault("stages", {}).update(entries)
        lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
        run_logged(_dvc("pull", *entries), root, env=_stage_env(), log=logger.info)


@task(name="fan-out-child")
def child_run(category: str, repo: str, commit: str, tracking_uri: str, lock: str | None) -> tuple[dict[str, Any], list[str]]:
    """Run the ``train-category`` deployment for ``category``; its lock entries and the stages it ran."""
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
    return entries, [row["stage"] for row in rows if row.get("ran")]


def _needs_gpu(params: Params, category: str) -> bool:
    import torch

    return params.for_category(category).train.device in ("auto", "cuda") and torch.cuda.is_available()


@flow(name="train-category", log_prints=True)
def train_category(category: str, repo: str, commit: str, tracking_uri: str, lock: str | None = None, workdir: str | None = None,
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
    _git(Path(tempfile.gettempdir()), "clone", "--quiet", repo, str(base))
    try:
        _git(base, "checkout", "--quiet", commit)
        if lock:
            (base / "dvc.lock").write_text(lock)
        env = _stage_env() | {"MLFLOW_TRACKING_URI": tracking_uri}
        run_logged(_dvc("pull", "--allow-missing"), base, env=env, log=logger.info)
        params = load_params(base / "params.yaml")
        timeout_s = params.for_category(category).retrain.stage_timeout_minutes * 60
        with concurrency(GPU_LIMIT, occupy=1) if _needs_gpu(params, category) else nullcontext():
            output = run_logged(_dvc("repro", f"package@{category}"), base, timeout_s, env=env, log=logger.info)
        run_logged(_dvc("push"), base, env=env, log=logger.info)
        lock = yaml.safe_load((base / "dvc.lock").read_text())["stages"]
        ran = set(stages_ran(output))
        mine = {name: entry for name, entry in lock.items() if stage_category(name) == category}
        create_table_artifact([{"stage": name, "ran": name in ran, "lock": json.dumps(entry)} for name, entry in mine.items()],
                              key=f"{LOCK_ARTIFACT}-{category}", description=f"dvc.lock entries of {category} at {commit[:12]}")
        return {"ran": sorted(ran), "stages": sorted(mine)}
    finally:
        if not keep_checkout:
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- one host: flow.serve


def require_server() -> str:
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise RuntimeError(
            "PREFECT_API_URL is not set. Schedules only fire on a real Prefect server (without the variable a client starts a hidden "
            "temporary one that nothing else sees): run `prefect server start` (or use your shared server) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api first."
        )
    return url


def serve_retrain(params: Params) -> None:
    """Serve ``retrain`` as the deployment ``retrain/served`` on ``params.retrain``'s cron (blocks).
    Its runs execute here, in this checkout; prefect.yaml's ``retrain/retrain`` is the work-pool one."""
    from prefect.schedules import Cron

    require_server()
    retrain.serve(name="served", schedules=[Cron(params.retrain.cron, timezone=params.retrain.timezone)],
                  parameters={"root": str(Path.cwd().resolve())})
