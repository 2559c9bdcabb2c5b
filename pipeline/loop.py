"""The loop from the line back into the models: the ``monitor`` and ``respond`` Prefect flows.

* ``monitor`` (its own deployment, every ``monitor.every_minutes``): per category, the model the
  line is using now (the ledger's latest record: a registry version, downloaded, or a bundle
  folder), its parts of the last ``monitor.window_hours`` per camera against the bundle's
  reference (urd.service.monitor, urd.drift), at one false-alarm budget per day
  (``monitor.false_alarms_per_day``, Bonferroni over the day's runs, the categories, their cameras
  and each camera's tests). It leaves a markdown artifact ``monitor-report`` (a table per camera and
  a score histogram per category), MLflow metrics (experiment ``monitor``) and, on a new drift, the
  Prefect event ``urd.drift.detected`` (resource ``urd.camera.<category>.<camera>``, the evidence as
  payload). A drift is raised once, not every run while it lasts (its state is in the ledger).
* ``respond`` (run by the deployment trigger on that event, prefect.yaml): when at least
  ``retrain.min_new_normals`` confirmed-good parts of that camera wait to be harvested (harvest
  routinely, so these are recent), it
  harvests them and runs ``retrain`` for that category alone (gated as always); otherwise it asks
  for the missing reviews in an artifact and widens the review band of the served model
  (``monitor.widen_review_to``) so they come sooner. Once they are in, the monitor raises
  ``urd.drift.reviewed`` and the trigger runs ``respond`` again.
"""

from __future__ import annotations

import io
import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger

from urd.config import Params, load_params

MONITOR_ARTIFACT = "monitor-report"
RESPOND_ARTIFACT = "respond-report"
DRIFT_EVENTS = ("urd.drift.detected", "urd.drift.reviewed")


def camera_resource(category: str, camera: str) -> dict[str, str]:
    return {"prefect.resource.id": f"urd.camera.{category}.{camera}", "prefect.resource.name": f"{category} / {camera}",
            "urd.category": category, "urd.camera": camera}


def served_bundle(ledger, category: str, cache: Path) -> tuple[str, str, str, Path] | None:
    """(model name, version, bundle digest, bundle folder) of the model that decided the
    category's latest part; None before the first part."""
    from urd.service.models import download_version

    row = ledger.latest_inspection(category)
    if row is None:
        return None
    if row.model_name.startswith("bundle:"):  # urd serve --bundle: the folder itself
        return row.model_name, row.model_version, row.bundle_digest, Path(row.model_name.removeprefix("bundle:"))
    return row.model_name, row.model_version, row.bundle_digest, download_version(row.model_name, row.model_version, cache)


def alpha_per_run(params: Params, categories: int) -> float:
    """The family-wise false-alarm probability of one run for one category (Bonferroni)."""
    runs_per_day = max(1.0, 24 * 60 / params.monitor.every_minutes)
    return params.monitor.false_alarms_per_day / runs_per_day / max(categories, 1)


def _figure(category: str, reference: np.ndarray, cameras: dict[str, np.ndarray], threshold: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    bins = np.histogram_bin_edges(np.concatenate([reference, *cameras.values()]), 40)
    ax.hist(reference, bins, density=True, alpha=0.5, label="reference (val)", color="grey")
    for camera, scores in cameras.items():
        ax.hist(scores, bins, density=True, histtype="step", linewidth=1.5, label=f"{camera} ({len(scores)} parts)")
    ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1, label="review threshold")
    ax.set(title=f"{category}: image scores, recent vs reference", xlabel="score", ylabel="density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def report_rows(category: str, reports) -> list[str]:
    rows = []
    for r in reports:
        if r.assessment is None:
            rows.append(f"| {category} | {r.camera} | {r.parts} | - | - | - | - | - | too few parts to test |")
            continue
        e = r.assessment.evidence
        brightness = e["images"].get("brightness", {}).get("relative_change", math.nan)
        rows.append(f"| {category} | {r.camera} | {r.parts} | {e['scores']['p_value']:.2e} | {e['scores']['psi']:.3f} | "
                    f"{e['flag_rate']['rate']:.3f} (expected {e['flag_rate']['expected']:.3f}, p {e['flag_rate']['p_value']:.2e}) | "
                    f"{brightness:+.1%} | {r.assessment.alpha_per_test:.1e} | "
                    f"{'**DRIFT: ' + r.assessment.cause + '**' if r.assessment.drift else 'stable'} |")
    return rows


@flow(name="monitor", log_prints=True)
def monitor(categories: list[str] | None = None, root: str = ".", emit: bool = True) -> dict[str, Any]:
    """Assess every category's cameras on the ledger's recent parts; see the module doc."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    from urd.calibrate import review_threshold
    from urd.service.ledger import Ledger, hours_ago, ledger_url
    from urd.service.monitor import drift_transitions, monitor_category
    from urd.service.store import ImageStore

    from . import tracking

    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    wanted = categories or params.dataset.categories
    alpha = alpha_per_run(params, len(wanted))
    m = params.monitor
    lines = [f"# Drift monitor: last {m.window_hours:g} h" + (f", at most {m.window_parts} parts per camera" if m.window_parts else ""), "",
             f"False-alarm budget {m.false_alarms_per_day:g} per day over {24 * 60 / m.every_minutes:g} runs and {len(wanted)} categories: "
             f"alpha {alpha:.1e} per category and run, split over its cameras and their tests.", "",
             "| category | camera | parts | scores KS p | PSI | flag rate | brightness | alpha per test | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    figures, metrics, raised, summary = {}, {}, [], {}
    ledger = Ledger(ledger_url(params.serve.ledger, root_path))
    try:
        ledger.upgrade()  # a ledger no service has written yet is an empty one, not an error
        for category in wanted:
            p = params.for_category(category)
            served = served_bundle(ledger, category, root_path / ".serve-cache" / "monitor")
            if served is None:
                lines.append(f"| {category} | - | 0 | - | - | - | - | - | no parts on record |")
                summary[category] = "no parts"
                continue
            name, version, digest, bundle = served
            metadata = json.loads((bundle / "metadata.json").read_text())
            reports = monitor_category(ledger, ImageStore(root_path / p.serve.image_store, p.serve.retention_days), category, bundle, metadata,
                                       hours_ago(m.window_hours), alpha=alpha, min_parts=m.min_parts, max_images=m.max_images,
                                       window_parts=m.window_parts)
            lines += report_rows(category, reports)
            events = drift_transitions(ledger, category, digest, (name, version), reports, p.retrain.min_new_normals)
            raised += events
            summary[category] = [f"{r.camera}: {'drift' if r.assessment and r.assessment.drift else 'stable' if r.assessment else 'untested'}"
                                 for r in reports]
            recent = {r.camera: np.asarray(r.scores) for r in reports}
            figures[category] = _figure(category, np.asarray(metadata["thresholds"]["val_scores"]), recent, review_threshold(metadata["thresholds"]))
            for r in reports:
                if r.assessment is not None:
                    e = r.assessment.evidence
                    key = f"{category}.{r.camera}"
                    metrics |= {f"{key}.ks_p": e["scores"]["p_value"], f"{key}.psi": e["scores"]["psi"], f"{key}.flag_rate": e["flag_rate"]["rate"],
                                f"{key}.drift": float(r.assessment.drift), f"{key}.parts": float(r.parts)}
    finally:
        ledger.engine.dispose()
    for event, payload in raised:
        logger.warning(f"{event}: {payload['category']} / {payload['camera']}" + (f" ({payload['cause']})" if "cause" in payload else ""))
        if emit:
            emit_event(event, camera_resource(payload["category"], payload["camera"]), payload=_json_safe(payload))
    out = root_path / "reports" / "monitor"
    out.mkdir(parents=True, exist_ok=True)
    for category, png in figures.items():
        (out / f"{category}.png").write_bytes(png)
        lines += ["", f"![{category}: recent scores against the reference]({(out / f'{category}.png').as_uri()})"]
    if raised:
        lines += ["", "## Raised", "", *[f"- `{e}`: {p['category']} / {p['camera']}" for e, p in raised]]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    create_markdown_artifact(markdown, key=MONITOR_ARTIFACT, description=f"drift monitor: {len(raised)} alarm(s)")
    try:
        tracking.configure(root_path)
        with mlflow.start_run(experiment_id=tracking.experiment_id("monitor", root_path), run_name="monitor"):
            mlflow.log_metrics({k.replace(" ", "_"): float(v) for k, v in metrics.items() if not math.isnan(v)})
            mlflow.log_artifacts(str(out), "monitor")
    except Exception as exc:  # the report and the events matter more than the tracking of them
        logger.warning(f"could not log the monitor's metrics to MLflow: {exc}")
    return {"alarms": [e for e, _ in raised], "categories": summary}


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@flow(name="respond", log_prints=True)
def respond(category: str, camera: str = "-", root: str = ".") -> dict[str, Any]:
    """The answer to a drift of ``category``: harvest and retrain it alone when enough confirmed-good
    parts wait, else ask for reviews and widen its review band; see the module doc."""
    from prefect.artifacts import create_markdown_artifact

    from urd.service.ledger import Ledger, ledger_url
    from urd.service.monitor import new_normals

    from .flows import retrain
    from .harvest import harvest_category

    logger = get_run_logger()
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    p = params.for_category(category)
    ledger = Ledger(ledger_url(p.serve.ledger, root_path))
    try:
        served = served_bundle(ledger, category, root_path / ".serve-cache" / "monitor")
        waiting = new_normals(ledger, category, camera)  # of the drifting camera: its view of the line now
        needed = p.retrain.min_new_normals
        if waiting < needed:
            note = widen_review(ledger, category, served, p.monitor.widen_review_to) if served else "no model has served this category yet"
            if served:
                ledger.add_model_event(category, "drift_waiting", served[0], served[1], served[2],
                                       {"camera": camera, "new_normals": waiting, "needed": needed, "review": note})
            text = (f"# {category}: a drift on camera {camera} waits for reviews\n\n{waiting} parts of camera {camera} are confirmed good "
                    f"and not yet harvested; {needed} are needed (`retrain.min_new_normals`) before the "
                    f"category is retrained on them. **Please review {needed - waiting} more parts of {category} from camera {camera}** on the "
                    f"review page (`/review?category={category}`).\n\n"
                    f"Review band: {note}.\n")
            logger.warning(f"{category}: {needed - waiting} more confirmed-good parts needed before a retrain; {note}")
            create_markdown_artifact(text, key=RESPOND_ARTIFACT, description=f"{category}: waiting for {needed - waiting} reviews")
            return {"category": category, "action": "waiting", "new_normals": waiting, "needed": needed}
    finally:
        ledger.engine.dispose()
    harvested = harvest_category(params, category, root_path, log=logger.info)
    result = retrain(categories=[category], root=str(root_path))
    ledger = Ledger(ledger_url(p.serve.ledger, root_path))
    try:
        if served:
            ledger.add_model_event(category, "drift_retrain", served[0], served[1], served[2],
                                   {"camera": camera, "harvest_id": harvested["harvest_id"], "retrain": _json_safe(result)})
    finally:
        ledger.engine.dispose()
    decision = (result.get("decisions") or {}).get(category)
    create_markdown_artifact(f"# {category}: retrained after a drift on camera {camera}\n\nHarvest `{harvested['harvest_id']}`: "
                             f"{harvested['good']} confirmed-good parts into training, {harvested['defect']} defects into the field set. "
                             f"Retrain: {', '.join(result.get('changed', [])) or 'nothing changed'}; gate: **{decision or '-'}**.\n",
                             key=RESPOND_ARTIFACT, description=f"{category}: harvested and retrained")
    return {"category": category, "action": "retrained", "harvest": harvested["harvest_id"], "decision": decision}


def widen_review(ledger, category: str, served: tuple[str, str, str, Path], share: float) -> str:
    """Lower the served model's review threshold to the (1 - ``share``) quantile of its val scores
    (never above its reject threshold), unless it is already that low; returns what was done."""
    from urd.calibrate import review_threshold

    name, version, digest, bundle = served
    calibration = json.loads((Path(bundle) / "metadata.json").read_text())["thresholds"]
    current = ledger.latest_threshold(category, digest)
    review_now = current.review_threshold if current else review_threshold(calibration)
    reject = current.image_threshold if current else float(calibration["image_threshold"])
    wider = min(float(np.quantile(calibration["val_scores"], 1 - share, method="lower")), reject)
    if wider >= review_now:
        return f"already wide (review threshold {review_now:.4g})"
    ledger.add_threshold_version(category, digest, wider, reject, "drift", "respond",
                                 f"widened after a drift until {category}'s reviews arrive ({share:.0%} of val normals to review)")
    return f"review threshold lowered from {review_now:.4g} to {wider:.4g} (about {share:.0%} of normal parts to review) until then"


def respond_trigger(root: str | None = None):
    """The deployment trigger of ``respond``: either drift event of any camera, its category and
    camera as the run's parameters (prefect.yaml declares the same)."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    parameters = {"category": "{{ event.payload.category }}", "camera": "{{ event.payload.camera }}"}
    if root:
        parameters["root"] = root
    return DeploymentEventTrigger(name="respond to drift", match={"prefect.resource.id": "urd.camera.*"}, expect=set(DRIFT_EVENTS),
                                  parameters=parameters)


def loop_deployments(params: Params, root: Path) -> list:
    """``monitor/served`` every ``monitor.every_minutes`` and ``respond/served`` on its trigger, for
    ``python -m pipeline serve`` (one host; several hosts: prefect.yaml)."""
    return [monitor.to_deployment(name="served", interval=timedelta(minutes=params.monitor.every_minutes), parameters={"root": str(root)}),
            respond.to_deployment(name="served", triggers=[respond_trigger(str(root))], parameters={"root": str(root)})]
