"""Entry points of the dvc.yaml stages: ``python -m pipeline <stage> [--category C]``.

Each is a thin wrapper over `urd`: it reads params.yaml, calls the library, writes the stage's
declared outputs and logs to MLflow (pipeline/tracking.py): train opens the category's run,
calibrate, evaluate and package log into it, package registers the bundle (pipeline/registry.py).
A failure prints one readable paragraph and exits non-zero, so DVC stops and nothing downstream
runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from urd.config import RUNTIME_KEYS, ConfigError, Params, load_params
from urd.files import CALIBRATION_FILE
from urd.runtime import ThreadBudget

PARAMS = Path("params.yaml")
DEMO_ROOT = Path("data/raw/demo")


# The params each per-category stage depends on, resolved for the category (base + its override)
# by the `stage_params` stage into data/params/<category>/<stage>.json: dvc.yaml lists those files as the
# stages' dependencies, so an override for one category reruns only that category's stages.
STAGE_PARAMS = {
    "ingest": ["dataset.name", "dataset.root", "dataset.val_fraction"],
    "validate": ["dataset.name", "dataset.min_train_images", "dataset.require_masks"],
    "prepare": ["dataset.name", "dataset.image_size", "synthesis.foreground.{category}"],
    "train": ["seed", "dataset.image_size", "model", "train", "synthesis"],
    "calibrate": ["calibrate"],
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
        "prepared": Path("data/prepared") / category,
        "model": Path("models") / category,
        "calibration": Path("models") / category / CALIBRATION_FILE,
        "mlflow_run": Path("models") / category / "mlflow_run.json",
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


def write_params(params: Params, category: str) -> None:
    """data/params/<category>/<stage>.json for every per-category stage (rewritten identically
    when nothing of the category's own params changed, so DVC skips its stages)."""
    folder = paths(category)["params"]
    folder.mkdir(parents=True, exist_ok=True)
    for stage in STAGE_PARAMS:
        (folder / f"{stage}.json").write_text(json.dumps(stage_params(params, category, stage), indent=2, sort_keys=True) + "\n")


def demo_data(params: Params) -> None:
    from urd.data.demo import DemoSpec, generate_demo

    generate_demo(DEMO_ROOT, DemoSpec(seed=params.seed))


def ingest(params: Params, category: str) -> None:
    from urd.data.manifest import build_manifest, write_manifest

    p = params.for_category(category)
    manifest = build_manifest(p.dataset.name, p.dataset.root, category, p.dataset.val_fraction)
    write_manifest(manifest, paths(category)["manifest"])


def validate(params: Params, category: str) -> None:
    from urd.data.manifest import read_manifest, write_manifest

    from .validation import validate as run_validation

    out = paths(category)
    manifest = read_manifest(out["manifest"])
    out["validated"].unlink(missing_ok=True)
    run_validation(manifest, params.for_category(category).dataset, category, out["validation"])
    write_manifest(manifest, out["validated"])


def textures(params: Params) -> None:
    from urd.data.prepare import prepare_textures

    source = prepare_textures(params, paths()["textures"])
    print(f"textures: {source}")


def prepare(params: Params, category: str) -> None:
    from urd.data.manifest import read_manifest
    from urd.data.prepare import prepare_category

    out = paths(category)
    print(json.dumps(prepare_category(read_manifest(out["validated"]), params, category, out["prepared"])))


def train(params: Params, category: str) -> None:
    import shutil

    import mlflow

    from urd.checkpoint import load_checkpoint
    from urd.data.manifest import read_manifest
    from urd.train import data_fingerprint, resume_problem, train_category

    from . import tracking

    out = paths(category)
    manifest = read_manifest(out["validated"])
    checkpoint = out["model"] / "checkpoints" / "last.pt"
    resume = checkpoint.exists()
    if resume:
        if resume_problem(load_checkpoint(checkpoint), checkpoint, params.for_category(category).fingerprint(), data_fingerprint(manifest)):
            # An interrupted run with other params or images (DVC reruns train when they change): start over.
            shutil.rmtree(checkpoint.parent)
            resume = False
    tracking.start_category_run(params, category, out["mlflow_run"], resume=resume)
    with tracking.category_run(out["mlflow_run"]):
        if out["validation"].is_dir():
            mlflow.log_artifacts(str(out["validation"]), "validation")

        def log_losses(iteration: int, losses: dict[str, float]) -> None:
            mlflow.log_metrics({f"train_{k}": float(v) for k, v in losses.items()}, step=iteration)

        trained = train_category(params, category, manifest, out["model"], out["prepared"], out["textures"], resume=resume, on_log=log_losses)
        mlflow.log_metrics({"train_seconds": trained["seconds"], "selected_iteration": trained["selected_iteration"]})
        mlflow.set_tag("texture_source", trained["texture_source"])
        mlflow.log_param("train.precision_resolved", trained["precision"])  # what train.precision (auto) became on this host
        mlflow.log_artifact(str(out["model"] / "training.json"))
    # The checkpoint only serves to resume an interrupted run; kept, a later run (new code) would
    # "resume" the finished one.
    shutil.rmtree(checkpoint.parent, ignore_errors=True)


def calibrate(params: Params, category: str) -> None:
    import mlflow

    from urd.calibrate import calibrate_model
    from urd.data.manifest import read_manifest

    from . import tracking

    out = paths(category)
    result = calibrate_model(out["model"], read_manifest(out["validated"]), params.for_category(category).calibrate)
    with tracking.category_run(out["mlflow_run"]):
        mlflow.log_metrics({k: float(v) for k, v in result.items() if k.endswith(("_threshold", "_rate"))})
        mlflow.log_artifact(str(out["calibration"]))
    print(json.dumps(result))


def evaluate(params: Params, category: str) -> None:
    import mlflow

    from urd.data.manifest import read_manifest
    from urd.evaluate import evaluate_model

    from . import tracking

    out = paths(category)
    p = params.for_category(category)
    metrics = evaluate_model(out["model"], read_manifest(out["validated"]), out["report"], p.evaluate.pro_fpr_limit, p.evaluate.gallery_size,
                             plots_dir=out["plots"])
    flat = {k: v for k, v in metrics["overall"].items()}
    flat |= {f"{d}/{k}": v for d, entry in metrics["per_defect_type"].items() for k, v in entry.items() if k != "images"}
    out["metrics"].parent.mkdir(parents=True, exist_ok=True)
    out["metrics"].write_text(json.dumps(flat, indent=2) + "\n")
    with tracking.category_run(out["mlflow_run"]):
        tracking.log_evaluation(metrics)
        mlflow.log_artifacts(str(out["report"]), "evaluation")
        mlflow.log_artifacts(str(out["plots"]), "evaluation/plots")


def package(params: Params, category: str) -> None:
    import mlflow

    from urd.data.manifest import read_manifest
    from urd.export import export_bundle

    from . import tracking
    from .model_card import write_model_card
    from .promotion import data_tags
    from .registry import register_bundle

    out = paths(category)
    p = params.for_category(category)
    metrics = json.loads((out["report"] / "metrics.json").read_text())
    manifest = read_manifest(out["validated"])
    lineage = tracking.lineage_tags(params, category)
    with tracking.category_run(out["mlflow_run"]) as run:
        lineage["mlflow_run_id"] = run.info.run_id
        export_bundle(out["model"], out["bundle"], p.package.formats, p.package.onnx_opset, metrics=metrics, lineage=lineage, overwrite=True)
        if p.package.quantize == "int8":
            _quantize(out["bundle"], manifest, p.dataset.image_size)
        card_json, card_md = write_model_card(out["bundle"], manifest)
        mlflow.log_artifact(str(card_md), "model_card")
        mlflow.log_artifact(str(card_json), "model_card")
        example = manifest.loc[manifest["split"] == "val", "path"].head(1).tolist()
        tags = lineage | data_tags(Path.cwd(), category) | {f"test_{k}": f"{v:.4f}" for k, v in metrics["overall"].items() if isinstance(v, float)}
        version = register_bundle(out["bundle"], p.dataset.name, category, tags, example[0] if example else None)
    print(f"registered {version.name} version {version.version} as @candidate ({tracking.tracking_uri()})")


def _quantize(bundle: Path, manifest, image_size: int) -> None:
    """model.int8.onnx calibrated on the val normals; its parity with fp32 on the test split
    (reported only) goes into metadata.json, where the model card reads it."""
    import numpy as np

    from urd.files import atomic_write_text
    from urd.data.torch_data import EvalDataset, eval_loader
    from urd.export import INT8_ONNX_FILE, METADATA_FILE, int8_parity, quantize_bundle

    val = manifest[manifest["split"] == "val"]
    images = [b["image"].numpy() for b in eval_loader(EvalDataset(val, image_size), 16)]
    quantize_bundle(bundle, np.concatenate(images) if images else np.zeros((0, 3, image_size, image_size), np.float32))
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    metadata["files"]["onnx_int8"] = INT8_ONNX_FILE
    metadata["int8"] = {"calibration_images": int(len(val)), "calibration_split": "val",
                        "parity_on_test": int8_parity(bundle, manifest[manifest["split"] == "test"].reset_index(drop=True))}
    atomic_write_text(bundle / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")


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
    console.print(f"metrics: metrics/<category>.json (dvc metrics show); plots and overlay gallery: plots/<category>/ (dvc plots show); "
                  f"reports: reports/<category>/")
    console.print(f"MLflow: {uri}  ->  mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")
    console.print("promote a candidate: python -m pipeline promote --category <category> [--dry-run]  (README: Operate it in a factory)")
    console.print("serve a category: mlflow models serve -m models:/urd-<dataset>-<category>@candidate --env-manager local")


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


def serve(params: Params) -> None:
    """Serve the retrain flow on its cron schedule (blocks; needs a real Prefect server)."""
    from .flows import serve_retrain

    serve_retrain(params)


STAGES = {"stage_params": write_params, "demo_data": demo_data, "ingest": ingest, "validate": validate, "textures": textures, "prepare": prepare,
          "train": train, "calibrate": calibrate, "evaluate": evaluate, "package": package, "summary": summary,
          "promote": promote, "rollback": rollback, "serve": serve, "status": status, "notify": notify}
GLOBAL_STAGES = {"demo_data", "textures", "summary", "serve", "status", "notify"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="dvc.yaml stage entry points, the promotion gate, rollback and serve")
    parser.add_argument("stage", choices=sorted(STAGES))
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
        elif args.stage in GLOBAL_STAGES:
            STAGES[args.stage](params)
        else:
            if not args.category:
                parser.error(f"{args.stage} needs --category")
            threads = params.for_category(args.category).train.threads  # unknown category -> clear error
            if args.stage == "promote":
                promote(params, args.category, args.dry_run, args.version)
            else:
                with ThreadBudget(threads):  # this host's cores, shared with the urd jobs beside it
                    STAGES[args.stage](params, args.category)
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        print(f"error in {args.stage}{' for ' + args.category if args.category else ''}: {exc}", file=sys.stderr)
        return 1
    return 0
