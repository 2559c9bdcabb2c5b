"""`python -m pipeline status`: per category, what serves and what waits, the last decision and
why, when it was last registered and whether its data, params or code changed since.

Reads the MLflow registry (aliases ``production`` / ``candidate``, the ``promotion.*`` tags) and
``dvc status`` of this checkout; ``--json`` prints the same for scripts, ``--report`` the latest
``retrain-report`` of the Prefect server as rendered markdown (``prefect artifact inspect`` shows
it JSON-escaped).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from urd.config import Params

from . import tracking
from urd.files import registered_name
from .promotion import PRODUCTION, TAG, _version, mlflow_errors
from .registry import CANDIDATE
from .workspace import changed_categories


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else ""


def category_status(params: Params, root: Path) -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    tracking.configure(root)
    client = MlflowClient()
    changed = changed_categories(root, params.dataset.categories, lock_wait_s=60, log=lambda line: None)
    rows = []
    for category in params.dataset.categories:
        model = registered_name(params.for_category(category).dataset.name, category)
        production, candidate = _version(client, model, None, PRODUCTION), _version(client, model, None, CANDIDATE)
        try:
            versions = client.search_model_versions(f"name='{model}'")
        except Exception:
            versions = []
        gated = [v for v in versions if v.tags.get(TAG + "decision")]
        last = max(gated, key=lambda v: (v.tags.get(TAG + "rolled_back", "") or v.tags.get(TAG + "time", ""))) if gated else None
        newest = max(versions, key=lambda v: int(v.version)) if versions else None
        rows.append({
            "category": category,
            "model": model,
            "production": str(production.version) if production else None,
            "candidate": str(candidate.version) if candidate else None,
            "last_decision": last.tags.get(TAG + "decision") if last else None,
            "last_decision_version": str(last.version) if last else None,
            "last_decision_reason": last.tags.get(TAG + "reason", "") if last else "",
            "last_decision_time": (last.tags.get(TAG + "rolled_back") or last.tags.get(TAG + "time", "")) if last else "",
            "last_registered": _when(newest.creation_timestamp) if newest else "",
            "last_registered_version": str(newest.version) if newest else None,
            "changed_since": changed.get(category, []),
        })
    return rows


def show(params: Params, root: Path, as_json: bool = False, report: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    if report:
        console.print(latest_report())
        return
    with mlflow_errors():
        rows = category_status(params, root)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"urd: {params.dataset.name} ({tracking.tracking_uri(root)})")
    for column in ("category", "production", "candidate", "last decision", "why", "last registered", "changed since (dvc status)"):
        table.add_column(column, overflow="fold")
    for r in rows:
        decision = f"{r['last_decision']} v{r['last_decision_version']} at {r['last_decision_time']}" if r["last_decision"] else "-"
        table.add_row(r["category"], f"v{r['production']}" if r["production"] else "none", f"v{r['candidate']}" if r["candidate"] else "none",
                      decision, r["last_decision_reason"][:200] or "-",
                      f"v{r['last_registered_version']} at {r['last_registered']}" if r["last_registered"] else "never",
                      ", ".join(r["changed_since"]) or "no")
    console.print(table)


def latest_report():
    """The newest ``retrain-report`` artifact of the Prefect server, as rich markdown."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from rich.markdown import Markdown

    from .flows import REPORT_ARTIFACT, require_server

    require_server()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_ARTIFACT])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    if not found:
        return "no retrain-report yet: no retrain run has finished on this Prefect server"
    return Markdown(found[0].data)
