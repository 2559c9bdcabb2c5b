"""Score a category's test split: metrics overall and per defect type, curves, overlay gallery.

The test split is only ever evaluated here; thresholds shown in the report come from
calibration on the val split (urd/calibrate.py) and are reported, never tuned on test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from .files import CALIBRATION_FILE, atomic_write_text
from .data.images import read_image, resize_image
from .metrics import auroc_interval, binary_curve, image_metrics, pixel_metrics, pro_curve


def _interval(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    low, high = auroc_interval(labels, scores)
    return {"image_auroc_ci_low": low, "image_auroc_ci_high": high}


def compute_metrics(labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray, defect_types: np.ndarray, pro_limit: float = 0.3) -> dict[str, Any]:
    """Overall metrics plus, per defect type, the metrics on (good test images + that type).

    Image AUROC comes with its 95% bootstrap interval (``image_auroc_ci_low`` / ``_high``): on a
    test split of a few dozen images it is only known to within several points.
    """
    has_masks = bool(masks.any())
    overall = image_metrics(labels, scores) | _interval(labels, scores)
    if has_masks:
        overall |= pixel_metrics(maps, masks, pro_limit)
    per_type = {}
    good = defect_types == "good"
    for defect in sorted(set(defect_types) - {"good"}):
        subset = good | (defect_types == defect)
        entry = {"images": int((defect_types == defect).sum())} | image_metrics(labels[subset], scores[subset]) | _interval(labels[subset], scores[subset])
        if has_masks and masks[defect_types == defect].any():
            entry |= pixel_metrics(maps[subset], masks[subset], pro_limit)
        per_type[defect] = entry
    return {"overall": overall, "per_defect_type": per_type, "counts": {"good": int(good.sum()), "defect": int((~good).sum())}}


HEADLINE = ("I-AUROC [95% CI]", "P-AUROC", "AUPRO@0.3")


def headline(overall: dict[str, float]) -> list[str]:
    """The three numbers every summary shows (percent; image AUROC with its bootstrap interval),
    for the HEADLINE columns; '-' where a metric was not computed (no masks)."""
    def pct(key: str) -> str:
        value = overall.get(key)
        return f"{100 * value:.1f}" if isinstance(value, (int, float)) and value == value else "-"

    interval = f" [{pct('image_auroc_ci_low')}-{pct('image_auroc_ci_high')}]" if "image_auroc_ci_low" in overall else ""
    return [pct("image_auroc") + interval, pct("pixel_auroc"), pct("pixel_aupro")]


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Test confusion matrix at a threshold calibrated elsewhere (reported, not tuned here)."""
    predicted = scores >= threshold
    labels = labels.astype(bool)
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    fn, tn = int((~predicted & labels).sum()), int((~predicted & ~labels).sum())
    return {
        "threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "false_positive_rate": fp / max(fp + tn, 1), "recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1),
    }


def plot_curves(labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray, out_dir: Path, pro_limit: float = 0.3) -> list[Path]:
    """ROC (image and pixel), PR (image and pixel) and PRO curves as PNGs; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = {"image": binary_curve(scores, labels)}
    if masks.any():
        curves["pixel"] = binary_curve(maps.ravel(), masks.ravel())
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, c in curves.items():
        ax.plot(np.r_[0, c.fps / max(c.negatives, 1)], np.r_[0, c.tps / max(c.positives, 1)], label=f"{name}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend()
    written.append(out_dir / "roc.png")
    fig.savefig(written[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, c in curves.items():
        ax.plot(c.tps / max(c.positives, 1), c.tps / np.maximum(c.tps + c.fps, 1), label=name)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend()
    written.append(out_dir / "pr.png")
    fig.savefig(written[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    if masks.any():
        fpr, pro = pro_curve(maps, masks, fpr_limit=1.0)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, pro)
        ax.axvline(pro_limit, ls=":", color="grey", label=f"FPR {pro_limit}")
        ax.set(xlabel="false positive rate (pixels)", ylabel="per-region overlap", title="PRO", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend()
        written.append(out_dir / "pro.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return written


def overlay(image: np.ndarray, amap: np.ndarray, vmax: float, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB image with the anomaly map as a heat overlay (and the ground-truth outline in green)."""
    heat = np.clip(amap / max(vmax, 1e-8), 0, 1)
    colored = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(image, 0.55, colored, 0.45, 0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    return out


def _tile(image: np.ndarray, caption: str) -> np.ndarray:
    bar = np.full((18, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, caption[: image.shape[1] // 6], (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, image], 0)


def gallery(rows: pd.DataFrame, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray, count: int, out_path: Path, threshold: float | None = None) -> Path | None:
    """The cases a quality engineer looks at: the highest-scoring good images and the
    lowest-scoring defects, each as image | ground truth | overlay."""
    if count == 0 or len(rows) == 0:
        return None
    labels = rows["label"].to_numpy()
    vmax = float(np.percentile(maps, 99.9)) if maps.size else 1.0
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    picks = [("good", i) for i in good[np.argsort(-scores[good])][:count]] + [("defect", i) for i in bad[np.argsort(scores[bad])][:count]]
    size = maps.shape[-1]
    lines = []
    for kind, i in picks:
        row = rows.iloc[i]
        image = resize_image(read_image(row["path"]), size)
        truth = np.repeat((masks[i][..., None] * 255).astype(np.uint8), 3, axis=2)
        decision = "" if threshold is None else (" FLAG" if scores[i] >= threshold else " pass")
        caption = f"{kind}/{row['defect_type']} {Path(row['path']).name} score {scores[i]:.3f}{decision}"
        lines.append(_tile(np.concatenate([image, truth, overlay(image, maps[i], vmax, masks[i])], 1), caption))
    grid = np.concatenate(lines, 0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return out_path


def write_report(rows: pd.DataFrame, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray, out_dir: str | Path, pro_limit: float = 0.3,
                 gallery_size: int = 8, calibration: dict | None = None, plots_dir: str | Path | None = None) -> dict[str, Any]:
    """metrics.json and scores.csv under ``out_dir``; curve plots and the overlay gallery under
    ``plots_dir`` (default: ``out_dir``)."""
    out_dir = Path(out_dir)
    plots_dir = out_dir if plots_dir is None else Path(plots_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    labels = rows["label"].to_numpy()
    metrics = compute_metrics(labels, scores, maps, masks, rows["defect_type"].to_numpy(), pro_limit)
    threshold = None
    if calibration is not None:
        threshold = calibration["image_threshold"]
        metrics["at_calibrated_threshold"] = confusion(labels, scores, threshold)
        if masks.any():
            metrics["at_calibrated_pixel_threshold"] = confusion(masks.ravel(), maps.ravel(), calibration["pixel_threshold"])
    frame = rows[["path", "label", "defect_type"]].copy()
    frame["score"] = scores
    frame.to_csv(out_dir / "scores.csv", index=False)
    plot_curves(labels, scores, maps, masks, plots_dir, pro_limit)
    gallery(rows, scores, maps, masks, gallery_size, plots_dir / "gallery.png", threshold)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_model(model_dir: str | Path, manifest: pd.DataFrame, out_dir: str | Path, pro_limit: float = 0.3, gallery_size: int = 8,
                   device: str = "cpu", progress: bool = True, plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Score the test split of ``manifest`` with the model in ``model_dir`` and write the report."""
    import torch

    from .checkpoint import load_model
    from .scoring import score_images

    graph, meta = load_model(model_dir, device)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise ValueError("the manifest has no test images to evaluate")
    maps, scores, masks = score_images(graph, test, meta["preprocessing"]["image_size"], torch.device(device), progress=progress, desc="evaluate")
    calibration_file = Path(model_dir) / CALIBRATION_FILE
    calibration = json.loads(calibration_file.read_text()) if calibration_file.is_file() else None
    return write_report(test, scores, maps, masks, out_dir, pro_limit, gallery_size, calibration, plots_dir)
