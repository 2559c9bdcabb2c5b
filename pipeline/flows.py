"""Prefect flows: unattended retraining, the promotion gate after it, and fan-out over workers.

* ``retrain``: ``dvc status`` -> the categories whose data, params or code changed -> their DVC
  stages (``dvc repro package@<category>``, one Prefect task per category, output streamed to the
  run's logger, retried only after transient failures, killed with its whole process group at the
  timeout) -> the promotion gate per category -> a markdown artifact ``retrain-report``. A category
  that fails (bad data, a crash) fails alone: the others still finish and are gated, and the flow
  run ends Failed. Nothing changed: a short run that says so and promotes nothing.
* ``fan_out=True`` (pipeline/fanout.py): each changed category whose inputs can reach a worker (committed to git or
  versioned in DVC: pipeline/workspace.py) runs as a ``train-category`` deployment on a work pool
  (``run_deployment``), in its own checkout (DVC locks a working copy while it runs): git commit +
  DVC remote in, outputs pushed to the DVC remote, MLflow to the shared server, and the
  ``dvc.lock`` entries of its stages handed back as a table artifact. The parent merges those
  entries and pulls the outputs, all or nothing, so its checkout reads as up to date.
* Every path: DVC calls wait for a busy checkout, the report is written even when the run stops,
  a category ``dvc status`` still reports changed afterwards fails the run, and Prefect events
  (``urd.retrain.failed``, ``urd.category.failed``, ``urd.promotion.rejected``) feed the
  automation of ``python -m pipeline notify``.
* ``serve_retrain``: ``retrain`` served as ``retrain/served`` on the cron of ``params.retrain``, with
  the drift monitor and its response (pipeline/loop.py) beside it (one host).
  Several hosts: ``prefect.yaml`` (deployments on a ``process`` work pool).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from urd.config import Params, load_params
from urd.evaluate import HEADLINE, headline

from .process import StageFailed
from .layout import paths
from . import fanout
from .fanout import error_text
from .workspace import GLOBAL_STAGES, changed_categories, dvc, stage_category, stages_ran

REPORT_ARTIFACT = "retrain-report"


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
def repro_category(root: str, category: str, timeout_s: float, lock_wait_s: float = 1800.0) -> list[str]:
    """`dvc repro package@<category>`: the category's stages that need it (and global ones)."""
    logger = get_run_logger()
    output = dvc(root, "repro", f"package@{category}", log=logger.info, timeout_s=timeout_s, lock_wait_s=lock_wait_s)
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


def report_markdown(results: list[CategoryResult], root: Path, nothing_changed: bool, promote: bool, fan_out: bool,
                    notes: list[str] | None = None) -> str:
    """The ``retrain-report`` artifact: per category what ran, metrics, decision and why, links;
    then anything the operator must know (a stopped run, a checkout still changed, two schedules)."""
    tail = "".join(f"\n- **note:** {note}" for note in notes or []) + ("\n" if notes else "")
    if nothing_changed:
        return "# Retrain: nothing changed\n\n`dvc status` reports no change in data, params or code: nothing ran, nothing was promoted.\n" + tail
    lines = [f"# Retrain: {sum(not r.error for r in results)} of {len(results)} categories rebuilt" + (" (fan-out)" if fan_out else ""), "",
             f"| category | stages run | result | {' | '.join(HEADLINE)} | decision | why | model card | MLflow run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        decision = r.gate.get("decision", "not gated" if not promote or r.error else "-")
        why = r.gate.get("reason", "") if r.gate else r.error
        card = paths(r.category)["bundle"] / "model_card.md"
        lines.append(f"| {r.category} | {len(r.ran)} ({', '.join(s.split('@')[0] for s in r.ran) or 'none'}) | {'FAILED' if r.error else 'ok'} | "
                     f"{' | '.join(headline(r.metrics))} | **{decision}** | {why.replace('|', '/').replace(chr(10), ' ')} | "
                     f"{'`' + str(card) + '`' if (root / card).is_file() and not r.error else '-'} | {r.mlflow_run or '-'} |")
    return "\n".join(lines) + "\n" + tail


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
    results: dict[str, CategoryResult] = {}
    notes: list[str] = []
    reported = False
    try:
        params = load_params(root_path / "params.yaml")
        lock_wait_s = params.retrain.lock_wait_minutes * 60
        wanted = categories or params.dataset.categories
        for category in wanted:
            params.for_category(category)  # an unknown category fails the run here, with the fix
        notes += schedule_conflicts(root_path)
        for note in notes:
            logger.warning(note)
        changed = changed_categories(root_path, wanted, lock_wait_s, log=logger.info)
        if any(stage_category(s) is None for stages in changed.values() for s in stages):
            # The generated demo or the textures changed: rebuild them here first (the demo then
            # holds an operator's edit in the DVC cache), and ask again which categories changed,
            # so an image edited in one category rebuilds that category only.
            dvc(root_path, "repro", *GLOBAL_STAGES, log=logger.info, lock_wait_s=lock_wait_s)
            changed = changed_categories(root_path, wanted, lock_wait_s, log=logger.info)
        if not changed:
            logger.info("nothing changed (dvc status): nothing to run, nothing to promote")
            create_markdown_artifact(report_markdown([], root_path, True, promote, fan_out, notes), key=REPORT_ARTIFACT,
                                     description="retrain: nothing changed")
            reported = True
            return {"changed": [], "failed": []}
        results = {c: CategoryResult(c) for c in changed}
        if fan_out:
            fanout.fan_out(root_path, results, params, repo, lock_wait_s)
        else:
            for category, result in results.items():
                rp = params.for_category(category).retrain
                state = repro_category.with_options(retries=rp.retries, retry_delay_seconds=rp.retry_delay_seconds)(
                    str(root_path), category, rp.stage_timeout_minutes * 60, lock_wait_s, return_state=True)
                if state.is_failed():
                    result.error = error_text(state)
                else:
                    result.ran = state.result()
        _still_changed(root_path, results, wanted, lock_wait_s, notes)
        for result in results.values():
            if result.error:
                continue  # its metrics and MLflow run on disk are an earlier run's: the report shows none
            _collect(root_path, result)
            if promote:
                state = gate_category(str(root_path), result.category, return_state=True)
                if state.is_failed():
                    result.error = "promotion gate failed: " + error_text(state)
                else:
                    result.gate = state.result()
    except Exception as exc:
        notes.append(f"the run stopped: {exc}")
        raise
    finally:
        if not reported:  # every path leaves a report, a failed one included
            markdown = report_markdown(list(results.values()), root_path, False, promote, fan_out, notes)
            create_markdown_artifact(markdown, key=REPORT_ARTIFACT, description=f"retrain of {', '.join(results) or 'nothing'}")
            announce(list(results.values()), failed=any(r.error for r in results.values()) or any("the run stopped" in n for n in notes),
                     notes=notes)
    failed = [c for c, r in results.items() if r.error]
    if failed:
        raise RuntimeError(f"retrain failed for {', '.join(failed)} (the other categories finished and were gated; see the retrain-report artifact)")
    return {"changed": list(results), "failed": [], "decisions": {c: r.gate.get("decision") for c, r in results.items()}}


def _still_changed(root: Path, results: dict[str, CategoryResult], wanted: list[str], lock_wait_s: float, notes: list[str]) -> None:
    """After the builds: a category that `dvc status` still reports changed was not built, whatever
    its stages said; it fails, so the run is never Completed with a changed category unbuilt."""
    after = changed_categories(root, wanted, lock_wait_s, log=lambda line: None)
    for category, stages in after.items():
        result = results.setdefault(category, CategoryResult(category))
        if not result.error:
            result.error = (f"still changed after the run (dvc status: {', '.join(stages)}): its stages did not build what this checkout "
                            "has; see the stages' log")
    if after:
        notes.append(f"`dvc status` in {root} still reports {', '.join(sorted(after))} changed after this run")


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


def scheduled_retrains(root: Path) -> list[str]:
    """The deployments of the ``retrain`` flow with an active schedule that work on the checkout
    ``root``: ``retrain/served`` (its ``root`` parameter) and the work-pool ``retrain/retrain``
    (its working directory, URD_CHECKOUT at deploy time)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for name in ("retrain/served", "retrain/retrain"):
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if not any(s.active for s in deployment.schedules or []) or getattr(deployment, "paused", False):
                continue
            folders = [Path((deployment.parameters or {}).get("root", "") or ".")] if name.endswith("served") else [
                Path(step.get("prefect.deployments.steps.set_working_directory", {}).get("directory", ""))
                for step in deployment.pull_steps or []]
            if any(str(f) not in ("", ".") and f.resolve() == root.resolve() for f in folders):
                found.append(name)
    return found


def schedule_conflicts(root: Path) -> list[str]:
    """A note when two schedules retrain this checkout (one would wait for the other's DVC lock)."""
    try:
        both = scheduled_retrains(root)
    except Exception:  # no server reachable: nothing to compare with
        return []
    if len(both) < 2:
        return []
    return [f"two schedules retrain this checkout ({' and '.join(both)}): keep one. Pause the other, e.g. "
            "`prefect deployment schedule pause retrain/served <schedule id>` (ids: `prefect deployment schedule ls retrain/served`), "
            "or stop `python -m pipeline serve`"]


def announce(results, failed: bool = False, notes: list[str] | None = None) -> None:
    """Prefect events a person can be notified of (`python -m pipeline notify`): ``urd.retrain.failed``
    for a failed run, ``urd.category.failed`` per failed category, ``urd.promotion.rejected`` per
    rejected candidate."""
    from prefect.events import emit_event

    try:
        if failed:
            emit_event("urd.retrain.failed", {"prefect.resource.id": "urd.retrain", "prefect.resource.name": "retrain"},
                       payload={"category": ", ".join(r.category for r in results if r.error), "error": "; ".join(notes or [])[:2000]
                                or "see the retrain-report artifact"})
        _announce(results, emit_event)
    except Exception as exc:  # a notification must never fail the run it reports on
        get_run_logger().warning(f"could not emit the run's events: {exc}")


def _announce(results, emit_event) -> None:
    for result in results:
        resource = {"prefect.resource.id": f"urd.category.{result.category}", "prefect.resource.name": result.category}
        if result.error:
            emit_event("urd.category.failed", resource, payload={"category": result.category, "error": result.error[:2000]})
        elif result.gate.get("decision") == "reject":
            emit_event("urd.promotion.rejected", resource, payload={"category": result.category, "reason": result.gate.get("reason", "")[:2000],
                                                                     "model": result.gate.get("model", ""),
                                                                     "version": result.gate.get("candidate_version", "")})


def serve_retrain(params: Params) -> None:
    """Serve ``retrain`` as the deployment ``retrain/served`` on ``params.retrain``'s cron, with the
    drift loop's ``monitor/served`` and ``respond/served`` (pipeline/loop.py) beside it (blocks).
    Its runs execute here, in this checkout; prefect.yaml's ``retrain/retrain`` is the work-pool one.
    Refused while ``retrain/retrain`` is scheduled on this same checkout."""
    from prefect.schedules import Cron

    require_server()
    if "retrain/retrain" in scheduled_retrains(Path.cwd()):
        raise RuntimeError(f"the work-pool deployment retrain/retrain already retrains this checkout ({Path.cwd().resolve()}) on a schedule; "
                           "two schedules on one checkout would fight over its DVC lock. Use one mode: either keep retrain/retrain "
                           "(prefect.yaml) and do not run `serve`, or remove it first: `prefect deployment delete retrain/retrain`.")
    from prefect import serve

    from .loop import loop_deployments

    root = Path.cwd().resolve()
    serve(retrain.to_deployment(name="served", schedules=[Cron(params.retrain.cron, timezone=params.retrain.timezone)],
                                parameters={"root": str(root)}),
          *loop_deployments(params, root))
