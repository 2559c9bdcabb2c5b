"""The promotion gate and rollback: the only code that moves the registry alias ``production``.

``promote`` takes the version with the alias ``candidate`` (set by the package stage) and

1. refuses it outright when the category's *current* data failed validation, when the candidate
   was not trained on the current validated manifest (a stale candidate: the pipeline stopped
   before packaging a new one) or when it was rolled back from production before;
2. scores the candidate and the current ``production`` version, both downloaded from the
   registry, on the same images: the test split of the current validated manifest (the data may
   have changed since production was trained, so production's own recorded metrics are not used);
   when the category has a field set (confirmed defects from the line), also each model's
   operating point at its own thresholds: the share of val normals it rejects and of the field
   set's defects it accepts without review;
3. promotes when the candidate clears every floor of ``promote.*``, is not worse than production
   by more than ``promote.max_regression`` on any gated metric and, with a field set, rejects no
   more good parts and lets no more defects through than ``promote.max_*_increase`` allow (no
   production yet: floors only). A candidate with production's weights (a threshold-only
   "recalibration" after a harvest of defects) goes through the same gate, marked as such;
4. records the decision on the candidate version (tags ``promotion.*``) and as a run in the MLflow
   experiment ``promotion``; only a "promote" moves the alias.

The whole read-compare-write is serialised per registered model, because MLflow has no
compare-and-set on aliases: a Prefect global concurrency limit ``promote-<model>`` (strict) when
``PREFECT_API_URL`` is set (any number of hosts), otherwise a file lock beside the local MLflow
store. ``rollback`` points ``production`` back at the version it replaced, under the same lock.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from urd.config import Params, PromoteParams

from . import tracking
from urd.files import registered_name
from .registry import CANDIDATE
from .layout import paths

PRODUCTION = "production"
UNMERGED = "pipeline.unmerged"  # tag: a fan-out child registered this version, the parent could not take its outputs
EXPERIMENT = "promotion"
TAG = "promotion."
# gated metric -> its floor in PromoteParams
FLOORS = {"image_auroc": "min_image_auroc", "pixel_auroc": "min_pixel_auroc", "pixel_aupro": "min_aupro"}
# with a field set, rates at each model's own thresholds (lower is better) -> the rise allowed in PromoteParams
OPERATING_POINTS = {"field_escape_rate": "max_escape_increase", "field_false_reject_rate": "max_false_reject_increase"}


class PromotionError(RuntimeError):
    """The gate cannot run (no candidate, no store it can lock...); the message says how to fix it."""


@dataclass
class Decision:
    model: str
    category: str
    decision: str  # promote | reject | noop | rollback
    reason: str
    candidate_version: str
    production_version: str | None  # production when the gate read it
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    production_metrics: dict[str, float] = field(default_factory=dict)
    test_images: int = 0
    started: str = ""
    finished: str = ""
    lock: str = ""
    gate_run_id: str = ""
    dry_run: bool = False
    recalibration: bool = False  # the candidate has production's weights: only its thresholds differ

    def tags(self) -> dict[str, str]:
        """The model-version tags that record this decision on the candidate."""
        tags = {"decision": self.decision, "reason": self.reason, "previous_production": self.production_version or "none",
                "started": self.started, "time": self.finished, "gate_run": self.gate_run_id, "lock": self.lock,
                "test_images": str(self.test_images), "recalibration": str(self.recalibration).lower()}
        tags |= {f"candidate.{k}": f"{v:.4f}" for k, v in self.candidate_metrics.items()}
        tags |= {f"production.{k}": f"{v:.4f}" for k, v in self.production_metrics.items()}
        return {TAG + k: v[:5000] for k, v in tags.items()}

    def summary(self) -> str:
        against = f" against production v{self.production_version}" if self.production_version else ""
        what = " (recalibration: same weights)" if self.recalibration else ""
        return f"{self.model} v{self.candidate_version}{what}{against}: {self.decision.upper()} - {self.reason}"


def judge(candidate: dict[str, float], production: dict[str, float] | None, rules: PromoteParams, production_version: str | None = None) -> tuple[str, str]:
    """("promote" | "reject", reason) from the two models' metrics on the same test images."""
    problems = []
    for metric, floor_key in FLOORS.items():
        value, floor = candidate.get(metric, math.nan), getattr(rules, floor_key)
        if math.isnan(value):
            if metric == "image_auroc":
                problems.append("image_auroc could not be computed (the test split needs good and defective images)")
            continue  # pixel metrics need masks; data without them is gated on image AUROC only
        if value < floor:
            problems.append(f"{metric} {value:.4f} is below the floor {floor:.4f} (promote.{floor_key})")
    if production is not None:
        for metric in FLOORS:
            new, old = candidate.get(metric, math.nan), production.get(metric, math.nan)
            if not (math.isnan(new) or math.isnan(old)) and new < old - rules.max_regression:
                problems.append(f"{metric} {new:.4f} is {old - new:.4f} below production v{production_version} ({old:.4f}) on the same images "
                                f"(promote.max_regression {rules.max_regression})")
        for metric, key in OPERATING_POINTS.items():
            new, old = candidate.get(metric, math.nan), production.get(metric, math.nan)
            if not (math.isnan(new) or math.isnan(old)) and new > old + getattr(rules, key) + 1e-12:
                problems.append(f"{metric} {new:.4f} is {new - old:.4f} above production v{production_version} ({old:.4f}) on the field set, each at "
                                f"its own thresholds (promote.{key} {getattr(rules, key)})")
    if problems:
        return "reject", "; ".join(problems)
    if production is None:
        return "promote", "clears every floor; no production version yet (floors only)"
    return "promote", f"clears every floor and is within {rules.max_regression} of production v{production_version} on every gated metric, on the same images"


def file_md5(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def data_tags(root: Path, category: str) -> dict[str, str]:
    """Tags the package stage puts on a new version: it ran after validation passed, on this manifest."""
    return {"data_validation": "passed", "validated_manifest_md5": file_md5(root / paths(category)["validated"])}


def data_problem(root: Path, category: str, candidate_tags: dict[str, str]) -> str | None:
    """Why the candidate may not be promoted whatever its metrics, or None."""
    out = paths(category)
    summary_file = root / out["validation"] / "summary.json"
    if not summary_file.is_file():
        return f"no validation report for {category} ({summary_file}): run `dvc repro` so the data is validated first"
    summary = json.loads(summary_file.read_text())
    if not summary.get("success"):
        broken = "; ".join(f"{f['rule']}: {', '.join(f['files'][:3])}" + (f" (+{f['count'] - 3} more)" if f["count"] > 3 else "") for f in summary.get("failures", []))
        return f"the category's current data failed validation ({broken}); fix the data and rerun the pipeline"
    if candidate_tags.get("data_validation") != "passed":
        return "the candidate was not registered by a pipeline run whose data passed validation (no data_validation=passed tag)"
    validated = root / out["validated"]
    if not validated.is_file():
        return f"{validated} is missing: run `dvc repro` first"
    if candidate_tags.get("validated_manifest_md5") != file_md5(validated):
        return ("the candidate was trained on other data than the current validated manifest (stale candidate: the pipeline has not "
                "packaged a model of the current data); run `dvc repro` first")
    if candidate_tags.get(UNMERGED):
        return f"its outputs could not be merged into the orchestrating checkout, so it was never gated: {candidate_tags[UNMERGED]}"
    if candidate_tags.get(TAG + "rolled_back"):
        return f"this version was rolled back from production at {candidate_tags[TAG + 'rolled_back']}; train and register a new version"
    return None


@contextmanager
def mlflow_errors() -> Iterator[None]:
    """MLflow's own errors (server down, permission...) as a PromotionError with its message."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise PromotionError(f"MLflow ({tracking.tracking_uri()}): {exc.message}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _lock_path(uri: str) -> Path | None:
    """The local file the MLflow store lives in (its lock goes beside it), or None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:") or "://" not in uri:
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    return None


def _ensure_limit(name: str) -> None:
    """Create the global concurrency limit ``name`` (1 slot) unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


@contextmanager
def serialised(model: str, uri: str) -> Iterator[str]:
    """Hold the promotion lock of registered model ``model``; yields what was locked.

    A local MLflow store: a file lock beside it, taken by every gate on this host, with or without
    Prefect (a manual ``promote`` and a flow's gate on the same model exclude each other). With
    ``PREFECT_API_URL``: also the Prefect global concurrency limit ``promote-<model>`` (any number
    of hosts; the only lock for a shared MLflow server). Always taken in that order."""
    store = _lock_path(uri)
    prefect = bool(os.environ.get("PREFECT_API_URL"))
    if store is None and not prefect:
        raise PromotionError(
            f"MLFLOW_TRACKING_URI={uri} is a shared server, so a local file lock cannot keep two hosts' gates apart. Set PREFECT_API_URL "
            "to the Prefect server: the gate then serialises on a Prefect global concurrency limit."
        )
    held: list[str] = []
    with ExitStack() as stack:
        if store is not None:
            from filelock import FileLock

            lock_file = store.with_name(f"{store.name}.{model}.promote.lock")
            stack.enter_context(FileLock(lock_file))
            held.append(f"file lock {lock_file}")
        if prefect:
            from prefect.concurrency.sync import concurrency

            limit = f"promote-{model}"
            _ensure_limit(limit)
            stack.enter_context(concurrency(limit, occupy=1, strict=True))
            held.append(f"prefect global concurrency limit {limit}")
        yield " + ".join(held)


def mark_unmerged(params: Params, category: str, version: str, why: str) -> None:
    """Tag a version a fan-out child registered but the parent could not merge: the gate refuses
    it, and ``candidate`` no longer points at it."""
    from mlflow import MlflowClient

    with mlflow_errors():
        tracking.configure()
        model = registered_name(params.for_category(category).dataset.name, category)
        client = MlflowClient()
        client.set_model_version_tag(model, version, UNMERGED, why[:5000])
        current = _version(client, model, None, CANDIDATE)
        if current is not None and str(current.version) == str(version):
            client.delete_registered_model_alias(model, CANDIDATE)


def _version(client, model: str, version: str | None, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model, version) if version else client.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None


def operating_point(scores, labels, calibration: dict) -> dict[str, float]:
    """A model's errors on the field set at its own thresholds: the share of good parts it rejects
    (score at or above ``image_threshold``) and of confirmed defects it accepts without review
    (score below the review threshold)."""
    from urd.calibrate import review_threshold

    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    good, defect = scores[labels == 0], scores[labels == 1]
    return {"field_false_reject_rate": float((good >= calibration["image_threshold"]).mean()) if len(good) else math.nan,
            "field_escape_rate": float((defect < review_threshold(calibration)).mean()) if len(defect) else math.nan}


def score_version(model: str, version: str, rows, pro_limit: float, field_rows=None) -> dict[str, float]:
    """Overall test metrics of a registered version's bundle on ``rows`` (downloaded from the
    registry), and its operating point on ``field_rows`` (val normals + the field set) if given."""
    import mlflow

    from urd.evaluate import compute_metrics
    from urd.inference import Predictor

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file would flood the flow's log
    with tempfile.TemporaryDirectory(prefix="urd-gate-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}", dst_path=tmp))
        bundle = next(local.rglob("metadata.json")).parent
        predictor = Predictor(bundle)
        maps, scores, masks = predictor.score_rows(rows)
        point = {}
        if field_rows is not None and len(field_rows) and predictor.calibration is not None:
            point = operating_point(predictor.score_rows(field_rows)[1], field_rows["label"].to_numpy(), predictor.calibration)
    metrics = compute_metrics(rows["label"].to_numpy(), scores, maps, masks, rows["defect_type"].to_numpy(), pro_limit)["overall"]
    return {k: float(metrics.get(k, math.nan)) for k in FLOORS} | point


def _record(client, decision: Decision, dataset: str) -> None:
    """The decision as a run in the ``promotion`` experiment and as tags on the candidate version."""
    import mlflow

    with mlflow.start_run(experiment_id=tracking.experiment_id(EXPERIMENT), run_name=f"{decision.model} v{decision.candidate_version}",
                          tags={"model": decision.model, "category": decision.category, "dataset": dataset, "decision": decision.decision,
                                "reason": decision.reason[:5000]}) as run:
        decision.gate_run_id = run.info.run_id
        mlflow.log_params({"candidate_version": decision.candidate_version, "production_version": decision.production_version or "none",
                           "test_images": decision.test_images, "lock": decision.lock})
        mlflow.log_metrics({f"candidate_{k}": v for k, v in decision.candidate_metrics.items() if not math.isnan(v)}
                           | {f"production_{k}": v for k, v in decision.production_metrics.items() if not math.isnan(v)})
        mlflow.log_dict(asdict(decision), "decision.json")
    for key, value in decision.tags().items():
        client.set_model_version_tag(decision.model, decision.candidate_version, key, value)


def _registry(params: Params, category: str, root: str | Path):
    """(repo root, tracking URI, the category's params, its registered model name, a client)."""
    from mlflow import MlflowClient

    root = Path(root).resolve()
    uri = tracking.configure(root)
    p = params.for_category(category)
    return root, uri, p, registered_name(p.dataset.name, category), MlflowClient()


def promote(params: Params, category: str, root: str | Path = ".", version: str | None = None, dry_run: bool = False) -> Decision:
    """Gate the ``candidate`` (or ``version``) of ``category`` against ``production``; see the module doc."""
    import pandas as pd

    from urd.data.field import field_defect_rows, field_set_folder
    from urd.data.manifest import read_manifest

    root, uri, p, model, client = _registry(params, category, root)
    candidate = _version(client, model, version, CANDIDATE)
    if candidate is None:
        what = f"version {version}" if version else f"version with the alias @{CANDIDATE}"
        raise PromotionError(f"{model} has no {what} in the registry at {uri}: run the pipeline (`dvc repro`) so the package stage registers one.")
    with nullcontext("none (dry run)") if dry_run else serialised(model, uri) as lock:
        started = _now()
        production = _version(client, model, None, PRODUCTION)
        decision = Decision(model, category, "", "", str(candidate.version), str(production.version) if production else None, started=started,
                            lock=lock, dry_run=dry_run)
        if decision.production_version == decision.candidate_version:
            decision.decision, decision.reason, decision.finished = "noop", f"v{candidate.version} already is production", _now()
            return decision
        problem = data_problem(root, category, candidate.tags)
        if problem:
            decision.decision, decision.reason = "reject", problem
        else:
            manifest = read_manifest(root / paths(category)["validated"])
            rows = _absolute(manifest[manifest["split"] == "test"], root)
            decision.test_images = len(rows)
            field = field_defect_rows(root / p.dataset.root, category, root / field_set_folder(p.harvest.field_root, p.dataset.name, category))
            field_rows = _absolute(pd.concat([manifest[manifest["split"] == "val"], field]), root) if len(field) else None
            decision.candidate_metrics = score_version(model, decision.candidate_version, rows, p.evaluate.pro_fpr_limit, field_rows)
            if production is not None:
                decision.production_metrics = score_version(model, decision.production_version, rows, p.evaluate.pro_fpr_limit, field_rows)
                same = candidate.tags.get("weights_md5")
                decision.recalibration = bool(same) and same == production.tags.get("weights_md5")
            decision.decision, decision.reason = judge(decision.candidate_metrics, decision.production_metrics if production else None, p.promote,
                                                       decision.production_version)
        decision.finished = _now()
        if not dry_run:
            _record(client, decision, p.dataset.name)
            if decision.decision == "promote":
                client.set_registered_model_alias(model, PRODUCTION, decision.candidate_version)
    return decision


def _absolute(rows, root: Path):
    rows = rows.reset_index(drop=True)
    rows["path"] = [str(path if Path(path).is_absolute() else root / path) for path in rows["path"]]
    rows["mask_path"] = [str(path if not path or Path(path).is_absolute() else root / path) for path in rows["mask_path"]]
    return rows


def rollback(params: Params, category: str, root: str | Path = ".") -> Decision:
    """Point ``production`` back at the version the current one replaced, and record it."""
    root, uri, p, model, client = _registry(params, category, root)
    with serialised(model, uri) as lock:
        current = _version(client, model, None, PRODUCTION)
        if current is None:
            raise PromotionError(f"{model} has no @{PRODUCTION} version in the registry at {uri}: nothing to roll back.")
        current_version = str(current.version)
        previous = current.tags.get(TAG + "previous_production", "none")
        if previous == "none" or _version(client, model, previous, "") is None:
            raise PromotionError(
                f"{model} v{current_version} replaced no earlier production version that still exists, so there is nothing to roll back to. "
                f"To stop serving it, delete the alias: MlflowClient().delete_registered_model_alias({model!r}, {PRODUCTION!r})."
            )
        now = _now()
        decision = Decision(model, category, "rollback", f"production moved back from v{current_version} to v{previous}", candidate_version=previous,
                            production_version=current_version, started=now, finished=now, lock=lock)
        import mlflow

        with mlflow.start_run(experiment_id=tracking.experiment_id(EXPERIMENT), run_name=f"{model} rollback v{current_version} -> v{previous}",
                              tags={"model": model, "category": category, "dataset": p.dataset.name, "decision": "rollback",
                                    "reason": decision.reason}) as run:
            decision.gate_run_id = run.info.run_id
            mlflow.log_params({"from_version": current_version, "to_version": previous})
            mlflow.log_dict(asdict(decision), "decision.json")
        # The registry tells the truth after a rollback: the version's decision is no longer
        # "promote", and it no longer holds @candidate (the gate would refuse it anyway).
        client.set_model_version_tag(model, current_version, TAG + "rolled_back", now)
        client.set_model_version_tag(model, current_version, TAG + "rolled_back_run", decision.gate_run_id)
        client.set_model_version_tag(model, current_version, TAG + "decision", "rolled_back")
        client.set_model_version_tag(model, current_version, TAG + "reason",
                                     f"rolled back at {now}: production moved back to v{previous} (it had been promoted at "
                                     f"{current.tags.get(TAG + 'time', '?')}: {current.tags.get(TAG + 'reason', '')})"[:5000])
        candidate = _version(client, model, None, CANDIDATE)
        if candidate is not None and str(candidate.version) == current_version:
            client.delete_registered_model_alias(model, CANDIDATE)
        client.set_model_version_tag(model, previous, TAG + "restored", now)
        client.set_registered_model_alias(model, PRODUCTION, previous)
    return decision
