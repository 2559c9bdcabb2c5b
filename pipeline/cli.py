"""``python -m pipeline <command>``: the dvc.yaml stages (pipeline/stages.py) and the commands an
operator runs around them: summary, promote, rollback, status, notify, serve, harvest.

A failure prints one readable paragraph and exits non-zero, so DVC stops and nothing downstream runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from urd.config import ConfigError, Params, load_params
from urd.runtime import ThreadBudget

from .layout import PARAMS, paths
from .stages import STAGES


def summary(params: Params) -> None:
    """After `dvc repro`: each category's test metrics and where the results are (not a DVC stage)."""
    from rich.console import Console
    from rich.table import Table

    from . import tracking

    from urd.evaluate import HEADLINE, headline

    table = Table(title=f"urd: {params.dataset.name} (test split)")
    for column in ("category", *HEADLINE, "model card (in the bundle)"):
        table.add_column(column)
    for category in params.dataset.categories:
        out = paths(category)
        if not out["metrics"].is_file():
            table.add_row(category, "-", "-", "-", "(not built: run dvc repro)")
            continue
        table.add_row(category, *headline(json.loads(out["metrics"].read_text())), str(out["bundle"] / "model_card.md"))
    console = Console(width=120)
    console.print(table)
    uri = tracking.tracking_uri()
    console.print("metrics: metrics/<category>.json (dvc metrics show); plots and overlay gallery: plots/<category>/ (dvc plots show); "
                  "reports: reports/<category>/")
    console.print(f"MLflow: {uri}  ->  mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")
    console.print("promote a candidate: python -m pipeline promote --category <category> [--dry-run]  (README: Operate it in a factory)")
    console.print("serve the line: urd serve (the @production models; --alias candidate for a trial), or urd serve --bundle <category>=bundles/<category>")


def promote(params: Params, category: str, dry_run: bool = False, version: str | None = None) -> None:
    """The promotion gate (pipeline/promotion.py): not a DVC stage; run after `dvc repro`."""
    from .promotion import mlflow_errors, promote as gate

    with mlflow_errors():
        decision = gate(params, category, Path.cwd(), version=version, dry_run=dry_run)
    print(("[dry run, nothing recorded] " if dry_run else "") + decision.summary())
    for metric in decision.candidate_metrics:
        old = decision.production_metrics.get(metric)
        print(f"  {metric:12s} candidate {decision.candidate_metrics[metric]:.4f}" + (f"   production {old:.4f}" if old is not None else ""))
    if decision.gate_run_id:
        print(f"recorded: tags promotion.* on v{decision.candidate_version}, run {decision.gate_run_id} in experiment 'promotion'")


def rollback(params: Params, category: str) -> None:
    from .promotion import mlflow_errors, rollback as restore

    with mlflow_errors():
        decision = restore(params, category, Path.cwd())
    print(f"{decision.model}: {decision.reason} (run {decision.gate_run_id} in experiment 'promotion')")


def status(params: Params, as_json: bool = False, report: bool = False) -> None:
    """Per category: production / candidate, last decision and why, last registered, changed since."""
    from .status import show

    show(params, Path.cwd(), as_json, report)


def notify(params: Params, url: str) -> None:
    """A Prefect automation that POSTs failed runs / categories and rejected candidates to ``url``."""
    from .notify import install

    print(json.dumps(install(url), indent=2))


def harvest(params: Params, category: str) -> None:
    """Reviewed inspections of the ledger -> the category's training data and field set, versioned."""
    from .harvest import run

    run(params, category)


def serve(params: Params) -> None:
    """Serve the retrain flow on its cron schedule (blocks; needs a real Prefect server)."""
    from .flows import serve_retrain

    serve_retrain(params)


COMMANDS = {"summary": summary, "serve": serve}  # with params only; promote, rollback, status, notify below
GLOBAL = {"demo_data", "textures", "summary", "serve", "status", "notify"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="dvc.yaml stage entry points, the promotion gate, rollback and serve")
    parser.add_argument("stage", choices=sorted({*STAGES, *COMMANDS, "promote", "rollback", "status", "notify", "harvest"}))
    parser.add_argument("--category", default=None)
    parser.add_argument("--params", default=str(PARAMS))
    parser.add_argument("--dry-run", action="store_true", help="promote: decide and print, record nothing, move nothing")
    parser.add_argument("--version", default=None, help="promote: gate this registered version instead of @candidate")
    parser.add_argument("--json", action="store_true", help="status: print JSON for scripts")
    parser.add_argument("--report", action="store_true", help="status: print the latest retrain-report of the Prefect server")
    parser.add_argument("--url", default=None, help="notify: where the automation POSTs (a webhook receiver)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if args.stage == "status":
            status(params, args.json, args.report)
        elif args.stage == "notify":
            if not args.url:
                parser.error("notify needs --url (the webhook receiver, e.g. https://chat.example/hooks/urd)")
            notify(params, args.url)
        elif args.stage in GLOBAL:
            {**STAGES, **COMMANDS}[args.stage](params)
        else:
            if not args.category:
                parser.error(f"{args.stage} needs --category")
            threads = params.for_category(args.category).train.threads  # unknown category -> clear error
            if args.stage == "promote":
                promote(params, args.category, args.dry_run, args.version)
            elif args.stage == "rollback":
                rollback(params, args.category)
            elif args.stage == "harvest":
                harvest(params, args.category)
            else:
                with ThreadBudget(threads):  # this host's cores, shared with the urd jobs beside it
                    STAGES[args.stage](params, args.category)
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        print(f"error in {args.stage}{' for ' + args.category if args.category else ''}: {exc}", file=sys.stderr)
        return 1
    return 0
