"""The bodies of the dvc.yaml stages, run as ``python -m pipeline <stage> [--category C]`` (pipeline/cli.py).

Each is a thin wrapper over `urd`: it reads params.yaml, calls the library, writes the stage's
declared outputs and logs to MLflow (pipeline/tracking.py): train opens the category's run,
calibrate, evaluate and package log into it, package registers the bundle (pipeline/registry.py).
A failure prints one readable paragraph and exits non-zero, so DVC stops and nothing downstream
runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from urd.config import Params

from .layout import DEMO_ROOT, STAGE_PARAMS, paths, stage_params


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
    manifest = build_manifest(p.dataset.name, p.dataset.root, category, p.dataset.val_fraction, exclude=p.dataset.exclude)
    write_manifest(manifest, paths(category)["manifest"])


def validate(params: Params, category: str) -> None:
    from urd.data.manifest import read_manifest, write_manifest

    from urd.data.validation import validate as run_validation

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

    from urd.data.manifest import read_manifest
    from urd.train import plan_training, train_category

    from . import tracking

    out = paths(category)
    manifest = read_manifest(out["validated"])
    plan = plan_training(params, category, manifest, out["model"])
    resume = plan.action == "resume"
    # DVC runs this stage only when a dependency changed; the model folder says which run to continue.
    print(plan.reason if plan.action != "up_to_date" else f"retraining {category}: DVC found a changed dependency (code or prepared data)")
    if not resume:
        shutil.rmtree(out["model"] / "checkpoints", ignore_errors=True)  # an interrupted run with other params or images
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


def calibrate(params: Params, category: str) -> None:
    import mlflow

    from urd.calibrate import calibrate_model
    from urd.data.field import field_defect_rows, field_set_folder
    from urd.data.manifest import read_manifest

    from . import tracking

    out = paths(category)
    p = params.for_category(category)
    # the field set as the dataset folder lists it (harvests.csv): a dependency of this stage, so a
    # harvest of defects reruns the calibration (a "recalibration" challenger) and nothing upstream
    field_rows = field_defect_rows(p.dataset.root, category, field_set_folder(p.harvest.field_root, p.dataset.name, category))
    result = calibrate_model(out["model"], read_manifest(out["validated"]), p.calibrate, field_rows=field_rows)
    field = result["field"] or {}
    if field.get("status") == "waiting":
        print(f"{category}: field set of {field['defect_parts']} confirmed defects: {field['reason']}")
    with tracking.category_run(out["mlflow_run"]):
        mlflow.log_metrics({k: float(v) for k, v in result.items() if k.endswith(("_threshold", "_rate"))})
        mlflow.log_metrics({f"field_{k}": float(field[k]) for k in ("good_parts", "defect_parts", "false_rejects", "escapes", "false_reject_bound",
                                                                     "escape_bound") if k in field})
        mlflow.set_tag("calibration_method", result["method"])
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


def field_lineage(p: Params, category: str, manifest) -> dict[str, str]:
    """The reviewed parts from the line a model learned from (tags on its version, lines in its card)."""
    from urd.data.field import field_provenance, field_set_folder

    field = field_provenance(manifest, p.dataset.root, category, field_set_folder(p.harvest.field_root, p.dataset.name, category))
    return {"field_train_images": str(field["field_train_images"]), "field_val_images": str(field["field_val_images"]),
            "field_defects": str(field["field_defects"]), "harvest_ids": ",".join(field["harvest_ids"]),
            "ledger_from": field["ledger_from"] or "", "ledger_to": field["ledger_to"] or ""}


def package(params: Params, category: str) -> None:
    import mlflow

    from urd.data.manifest import read_manifest
    from urd.challenge import write_challenge_set
    from urd.drift import write_reference
    from urd.export import add_int8_graph, export_bundle

    from . import tracking
    from .model_card import write_model_card
    from .promotion import data_tags, file_md5
    from .registry import register_bundle

    out = paths(category)
    p = params.for_category(category)
    metrics = json.loads((out["report"] / "metrics.json").read_text())
    manifest = read_manifest(out["validated"])
    lineage = tracking.lineage_tags(params, category) | field_lineage(p, category, manifest)
    with tracking.category_run(out["mlflow_run"]) as run:
        lineage["mlflow_run_id"] = run.info.run_id
        export_bundle(out["model"], out["bundle"], p.package.formats, p.package.onnx_opset, metrics=metrics, lineage=lineage, overwrite=True)
        if p.package.quantize == "int8":
            add_int8_graph(out["bundle"], manifest, p.dataset.image_size)
        write_challenge_set(out["bundle"], manifest, seed=p.seed)
        write_reference(out["bundle"], manifest, dataset_root=p.dataset.root, category=category)
        card_json, card_md = write_model_card(out["bundle"], manifest)
        mlflow.log_artifact(str(card_md), "model_card")
        mlflow.log_artifact(str(card_json), "model_card")
        example = manifest.loc[manifest["split"] == "val", "path"].head(1).tolist()
        tags = lineage | data_tags(Path.cwd(), category) | {f"test_{k}": f"{v:.4f}" for k, v in metrics["overall"].items() if isinstance(v, float)}
        tags["weights_md5"] = file_md5(out["weights"])  # equal to production's: a threshold-only "recalibration"
        version = register_bundle(out["bundle"], p.dataset.name, category, tags, example[0] if example else None)
    print(f"registered {version.name} version {version.version} as @candidate ({tracking.tracking_uri()})")


# The dvc.yaml stages (global ones take params; the others params and a category).
STAGES = {"stage_params": write_params, "demo_data": demo_data, "textures": textures, "ingest": ingest, "validate": validate,
          "prepare": prepare, "train": train, "calibrate": calibrate, "evaluate": evaluate, "package": package}
