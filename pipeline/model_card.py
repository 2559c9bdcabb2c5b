"""The model card of a packaged category model: ``model_card.json`` + ``model_card.md`` in the bundle.

Built from what the bundle's metadata.json already records (architecture, preprocessing,
thresholds, test metrics, lineage) plus the category's manifest (image counts per split and
defect type). Sections follow the usual model-card outline: model details, intended use and
out-of-scope uses, training data, evaluation data, metrics, thresholds, caveats, how to use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from urd.files import atomic_write_text, registered_name

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
METRIC_NAMES = {
    "image_auroc": "Image AUROC (95% CI)", "image_ap": "Image AP", "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC", "pixel_ap": "Pixel AP", "pixel_aupro": "AUPRO (FPR <= 0.3)", "pixel_f1_max": "Pixel F1-max",
}


def _method(arch: dict[str, Any]) -> str:
    """What was trained, in words: the full URD, or the variant params chose (expert off, no GII)."""
    paper = "URD (Unlocking the Potential of Reverse Distillation, AAAI 2025)"
    gii = {"gii": "Guided Information Injection", "skip": "a fused skip connection (no GII gating)", "none": "the plain RD decoder"}
    decoder = gii.get(arch.get("gii"), str(arch.get("gii")))
    if arch.get("expert_in_training", True):
        return f"{paper}: Expert-Teacher-Student reverse distillation with {decoder}"
    return f"{paper} with the expert off: reverse distillation from the frozen pretrained teacher, student with {decoder}"


def _caveats(metadata: dict[str, Any], counts: dict[str, Any], thresholds: dict[str, Any]) -> list[str]:
    caveats = []
    if metadata.get("weights_source") == "none":
        caveats.append(
            "WARNING: the backbone (teacher/expert encoder) was RANDOMLY INITIALISED, not pretrained (model.weights: none, "
            "for tests only); scores are far weaker than the paper's. Do not use this model on a production line; retrain with "
            "model.weights: imagenet."
        )
    training = metadata.get("training") or {}
    if training.get("texture_source") == "procedural" and training.get("dtd_root"):
        caveats.append(
            f"WARNING: synthetic anomalies were made with PROCEDURAL textures: synthesis.dtd_root was {training['dtd_root']!r}, but no "
            "DTD images were found there. The paper uses DTD; place the DTD images there (images/<class>/*.jpg) and retrain."
        )
    if metadata.get("dataset") == "demo":
        caveats.append("Trained and evaluated on the generated demo dataset (synthetic images), not on real parts.")
    test = counts["test"]
    if test["defect"] < 30 or test["good"] < 30:
        caveats.append(f"Small test set ({test['good']} good, {test['defect']} defective images): metrics have wide confidence intervals.")
    if counts["val"] < 20:
        caveats.append(f"Thresholds come from only {counts['val']} held-out normal images; the false-positive rate on the line may differ from the target.")
    target, val_images = thresholds.get("target_fpr"), thresholds.get("val_images")
    if thresholds.get("method") == "val_quantile" and target and val_images and target < 1 / val_images:
        caveats.append(
            f"The image threshold targets a false-positive rate of {target:g}, but {val_images} held-out normal images only "
            f"resolve rates in steps of 1/{val_images} = {1 / val_images:.3f}: the threshold is the highest val score, and "
            f"normal parts may be flagged at several times the target. Hold out at least {math.ceil(1 / target)} normal "
            "images (more training images or a larger dataset.val_fraction), or calibrate with labelled defects."
        )
    image_auroc = (metadata.get("metrics") or {}).get("overall", {}).get("image_auroc")
    if image_auroc is not None and image_auroc < 0.9:
        caveats.append(f"Image AUROC on the test split is {image_auroc:.3f} (< 0.90): expect missed defects and false alarms.")
    caveats.append("Anomalies are deviations from the training images: new lighting, fixtures, product variants or camera "
                   "positions will raise scores and need a retrain on images of the new normal.")
    return caveats


def build_card(metadata: dict[str, Any], manifest: pd.DataFrame) -> dict[str, Any]:
    """The card as a JSON-serialisable dict."""
    dataset, category = metadata["dataset"], metadata["category"]
    split = manifest["split"]
    test = manifest[split == "test"]
    counts = {
        "train": int((split == "train").sum()),
        "val": int((split == "val").sum()),
        "test": {"good": int((test["label"] == 0).sum()), "defect": int((test["label"] == 1).sum()),
                 "per_defect_type": {str(k): int(v) for k, v in test.loc[test["label"] == 1, "defect_type"].value_counts().sort_index().items()}},
    }
    metrics = metadata.get("metrics") or {}
    thresholds = metadata.get("thresholds") or {}
    name = registered_name(dataset, category)
    lineage = metadata.get("lineage") or {}
    return {
        "model_details": {
            "name": name,
            "method": _method(metadata.get("architecture") or {}),
            "category": category,
            "dataset": dataset,
            "architecture": metadata.get("architecture"),
            "weights_source": metadata.get("weights_source"),
            "preprocessing": metadata.get("preprocessing"),
            "training": metadata.get("training"),
            "urd_version": metadata.get("urd_version"),
            "files": metadata.get("files"),
            "int8": metadata.get("int8"),
        },
        "intended_use": [
            f"Flag anomalous (defective) images of '{category}' parts photographed like the training images, and localise the defect with the anomaly map.",
            "Support a human quality inspector or sort parts for review at the calibrated operating point.",
        ],
        "out_of_scope": [
            "Other products, camera set-ups or lighting than the training images.",
            "Classifying the defect type (the model only says how anomalous and where).",
            "Safety-critical accept decisions without human review.",
        ],
        "training_data": {
            "description": "Normal (defect-free) images only; synthetic anomalies (Perlin masks + textures) are generated during training.",
            "train_images": counts["train"],
            "val_images": counts["val"],
            "val_use": "held-out normal images, used for model selection and threshold calibration (never the test split)",
            "anomaly_textures": (metadata.get("training") or {}).get("texture_source", "unknown"),
            "dvc_data_md5": lineage.get("dvc_data_md5", "unknown"),
            "dvc_manifest_md5": lineage.get("dvc_manifest_md5", "unknown"),
            # reviewed parts from the line (python -m pipeline harvest), when any
            "field_train_images": int(lineage.get("field_train_images", 0)),
            "field_val_images": int(lineage.get("field_val_images", 0)),
            "field_defects": int(lineage.get("field_defects", 0)),
            "harvest_ids": [h for h in str(lineage.get("harvest_ids", "")).split(",") if h],
        },
        "evaluation_data": {"split": "test", **counts["test"]},
        "metrics": {"overall": metrics.get("overall", {}), "per_defect_type": metrics.get("per_defect_type", {})},
        "thresholds": {
            "image_threshold": thresholds.get("image_threshold"),
            "review_threshold": thresholds.get("review_threshold"),
            "review_target_fpr": thresholds.get("review_target_fpr"),
            "pixel_threshold": thresholds.get("pixel_threshold"),
            "method": thresholds.get("method"),
            "target_fpr": thresholds.get("target_fpr"),
            "val_false_positive_rate": thresholds.get("val_false_positive_rate"),
            "field": thresholds.get("field"),
            "test_at_image_threshold": metrics.get("at_calibrated_threshold"),
            "test_at_pixel_threshold": metrics.get("at_calibrated_pixel_threshold"),
            "normalisation": "normalised score = clip((score - image_threshold) / (image_max - image_min) + 0.5, 0, 1); decision: reject at "
                             "score >= image threshold (normalised >= 0.5), review at score >= review threshold, accept below",
        },
        "caveats": _caveats(metadata, counts, thresholds),
        "how_to_use": {
            "predict": "urd predict <images or folder> --model <this bundle folder> --out predictions/",
            "serve": f"urd serve --bundle {category}=<this bundle folder> (or, once promoted, urd serve: {name}@production from the registry)",
            "inspect": f"urd inspect <images or folder> --server http://127.0.0.1:8600 --category {category} (urd watch <folder> for a camera's drop folder)",
            "mlflow": f"mlflow models serve -m models:/{name}@candidate --env-manager local -h 127.0.0.1 -p 5001",
            "python": "from urd.inference import Predictor; Predictor('<bundle folder>').predict(['part.png'])",
            "onnx": "model.onnx: input 'images' (N x 3 x S x S, float32, RGB in [0, 1]; the backbone's normalisation is inside the graph) -> 'anomaly_map', 'score'",
            "thresholds": "under urd serve an admin moves them without a restart (PUT /v1/admin/thresholds/<category>, recorded as a "
                          "threshold version); for urd predict edit thresholds in metadata.json (read at load time)",
        },
        "lineage": lineage,
    }


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _metric(entry: dict[str, Any], key: str) -> str:
    """One table cell; image AUROC with its 95% bootstrap interval when the report has it."""
    if key == "image_auroc" and "image_auroc_ci_low" in entry:
        return f"{_fmt(entry.get(key))} ({entry['image_auroc_ci_low']:.3f}-{entry['image_auroc_ci_high']:.3f})"
    return _fmt(entry.get(key))


def render_markdown(card: dict[str, Any]) -> str:
    d = card["model_details"]
    lines = [f"# Model card: {d['name']}", ""]
    for caveat in card["caveats"]:
        if caveat.startswith("WARNING"):
            lines += [f"> **{caveat}**", ""]
    lines += ["## Model details", "", f"- Method: {d['method']}", f"- Category: `{d['category']}`, dataset: `{d['dataset']}`"]
    arch = d.get("architecture") or {}
    lines += [f"- Backbone: `{arch.get('backbone')}` (weights: **{d.get('weights_source')}**), GII: `{arch.get('gii')}`, "
              f"expert in training: {arch.get('expert_in_training')}"]
    pre = d.get("preprocessing") or {}
    lines += [f"- Input: {pre.get('image_size')}x{pre.get('image_size')} {pre.get('color')}, resize {pre.get('resize')}, "
              f"scale {pre.get('scale')}, mean {pre.get('mean')}, std {pre.get('std')}"]
    t = d.get("training") or {}
    if t:
        requested = f", train.precision {t['precision_requested']}" if t.get("precision_requested") not in (None, t.get("precision")) else ""
        lines += [f"- Training: {t.get('iterations')} iterations on {t.get('device')} ({t.get('precision')}{requested}), "
                  f"{_fmt(t.get('seconds'))} s, kept iteration {t.get('selected_iteration')} (selection: {t.get('selection')})"]
    q = d.get("int8")
    if q:
        parity = q["parity_on_test"]
        aurocs = ", ".join(f"{kind} AUROC {_fmt(parity.get(f'fp32_{kind}_auroc'))} -> {_fmt(parity.get(f'int8_{kind}_auroc'))}"
                           for kind in ("image", "pixel") if f"fp32_{kind}_auroc" in parity)
        lines += [f"- int8 graph `{d['files'].get('onnx_int8')}` (calibrated on {q['calibration_images']} val normals): on the test split, "
                  f"image-score Spearman {_fmt(parity['image_score_spearman'])} with fp32; {aurocs} (fp32 -> int8)"]
    lines += ["", "## Intended use", "", *[f"- {x}" for x in card["intended_use"]], "", "## Out-of-scope uses", "",
              *[f"- {x}" for x in card["out_of_scope"]], ""]
    td = card["training_data"]
    lines += ["## Training data", "", f"- {td['description']}", f"- {td['train_images']} training images, {td['val_images']} val images ({td['val_use']})",
              f"- Textures of the synthetic anomalies: `{td['anomaly_textures']}`",
              f"- DVC hash of the raw data: `{td['dvc_data_md5']}`; of the manifest: `{td['dvc_manifest_md5']}`"]
    if td["field_train_images"] or td["field_val_images"] or td["field_defects"]:
        lines.append(f"- From the line (reviewed parts): {td['field_train_images']} training and {td['field_val_images']} val images confirmed "
                     f"good, {td['field_defects']} confirmed defects in the field set; harvests {', '.join(td['harvest_ids']) or '-'}")
    else:
        lines.append("- From the line: no reviewed parts (no harvest yet)")
    lines.append("")
    ed = card["evaluation_data"]
    per_type = ", ".join(f"{k}: {v}" for k, v in ed["per_defect_type"].items())
    lines += ["## Evaluation data", "", f"- Test split: {ed['good']} good and {ed['defect']} defective images ({per_type})", ""]
    overall = card["metrics"]["overall"]
    keys = [k for k in METRIC_NAMES if k in overall]
    lines += ["## Metrics (test split)", "", "| | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|",
              "| overall | " + " | ".join(_metric(overall, k) for k in keys) + " |"]
    for defect, entry in card["metrics"]["per_defect_type"].items():
        lines.append(f"| {defect} | " + " | ".join(_metric(entry, k) for k in keys) + " |")
    th = card["thresholds"]
    lines += ["", "## Calibrated thresholds", "", f"- Image threshold {_fmt(th['image_threshold'])}, pixel threshold {_fmt(th['pixel_threshold'])} "
              f"(method: {th['method']}, target false-positive rate {th['target_fpr']}; on val: {_fmt(th['val_false_positive_rate'])})"]
    if th.get("review_threshold") is not None:
        lines.append(f"- Review threshold {_fmt(th['review_threshold'])} (target rate of val normals sent to review or rejected: "
                     f"{th['review_target_fpr']})")
    field = th.get("field") or {}
    if field.get("status") == "calibrated":
        lines.append(f"- From verdicts: {field['good_parts']} good parts (val) and {field['defect_parts']} confirmed defects (field set); at "
                     f"{field['confidence']:.0%} confidence false rejects are at most {field['false_reject_bound']:.2%} ({field['false_rejects']} "
                     f"seen) and escapes at most {field['escape_bound']:.2%} ({field['escapes']} seen)"
                     + (f"; about {field['reviews_per_shift']:.0f} reviews per shift (capacity {field['review_capacity']}"
                        f"{'' if field['fits_capacity'] else ', OVER capacity'})" if field.get("reviews_per_shift") is not None else ""))
    elif field.get("status") == "waiting":
        lines.append(f"- Field set of {field['defect_parts']} confirmed defects not used yet: {field['reason']}")
    for key, label in (("test_at_image_threshold", "images"), ("test_at_pixel_threshold", "pixels")):
        c = th.get(key)
        if c:
            lines.append(f"- Test {label} at this threshold (reported, not tuned): false-positive rate {_fmt(c['false_positive_rate'])}, "
                         f"recall {_fmt(c['recall'])}, precision {_fmt(c['precision'])} (tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']})")
    lines += [f"- {th['normalisation']}", "", "## Caveats", "", *[f"- {x}" for x in card["caveats"]], "", "## How to use", ""]
    lines += [f"- {k}: `{v}`" if k != "thresholds" else f"- {k}: {v}" for k, v in card["how_to_use"].items()]
    lines += ["", "## Lineage", "", *[f"- {k}: `{v}`" for k, v in card["lineage"].items()], ""]
    return "\n".join(lines)


def write_model_card(bundle_dir: str | Path, manifest: pd.DataFrame) -> tuple[Path, Path]:
    """Write model_card.json and model_card.md into the bundle; returns their paths."""
    bundle_dir = Path(bundle_dir)
    metadata = json.loads((bundle_dir / "metadata.json").read_text())
    card = build_card(metadata, manifest)
    atomic_write_text(bundle_dir / CARD_JSON, json.dumps(card, indent=2) + "\n")
    atomic_write_text(bundle_dir / CARD_MD, render_markdown(card))
    return bundle_dir / CARD_JSON, bundle_dir / CARD_MD
