"""Time of the full metric set on a category-sized test split (~150 images at 256^2).

    python -m bench.evaluation [--images 150] [--size 256]

urd.metrics (one shared sort; AUPRO with a partial sort) against scikit-learn-only code computing
the same numbers (roc_auc_score, average_precision_score, precision_recall_curve for F1-max, each
sorting the pixels again; AUPRO by the reference recipe: scipy.ndimage.label + a full sort).
Prints a table and writes bench/results/evaluation_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from bench.machine import RESULTS, machine

from urd.metrics import aupro, integrate_up_to, pixel_metrics


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    labels = np.zeros(masks.shape, np.int64)
    offset = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        labels[i] = np.where(lab > 0, lab + offset, 0)
        offset += n
    flat, lab = maps.ravel().astype(np.float64), labels.ravel()
    normal = lab == 0
    sizes = np.bincount(lab).astype(np.float64)
    weights = np.where(normal, 0.0, 1.0 / (sizes[lab] * offset))
    order = np.argsort(-flat, kind="stable")
    s = flat[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    fpr = np.r_[0.0, np.cumsum(normal[order])[ends] / normal.sum()]
    pro = np.r_[0.0, np.cumsum(weights[order])[ends]]
    return integrate_up_to(fpr, pro, limit)


def sklearn_only(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    y, s = masks.ravel(), maps.ravel()
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    return {"pixel_auroc": roc_auc_score(y, s), "pixel_ap": average_precision_score(y, s), "pixel_f1_max": float(f1),
            "pixel_aupro": reference_aupro(maps, masks)}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, s = args.images, args.size
    masks = np.zeros((n, s, s), bool)
    for i in range(n // 2, n):  # half the images carry 1-3 defects of varied size
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, s - 40, 2)
            h, w = rng.integers(3, 40, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = (rng.random((n, s, s), dtype=np.float32) + 0.6 * masks).astype(np.float32)

    ours, t_ours = timed(pixel_metrics, maps, masks)
    alone, t_aupro = timed(aupro, maps, masks, 0.3)
    ref, t_ref = timed(sklearn_only, maps, masks)
    diff = max(abs(ours[k] - ref[k]) for k in ref)
    assert diff < 1e-6 and abs(alone - ref["pixel_aupro"]) < 1e-6, (ours, ref)

    table = Table(title=f"Pixel metrics on {n} images at {s}x{s} ({masks.size / 1e6:.1f} M pixels)")
    for col in ("what", "seconds"):
        table.add_column(col, justify="right")
    table.add_row("urd.metrics.pixel_metrics (AUROC, AP, F1-max, AUPRO)", f"{t_ours:.2f}")
    table.add_row("scikit-learn-only code, same four numbers", f"{t_ref:.2f}")
    table.add_row("urd.metrics.aupro alone", f"{t_aupro:.2f}")
    table.add_row("largest difference between the two", f"{diff:.1e}")
    Console(width=120).print(table)
    out = RESULTS / "evaluation_cpu.json"
    out.write_text(json.dumps({"machine": machine(), "images": n, "size": s, "seconds_urd": t_ours, "seconds_sklearn_only": t_ref,
                               "seconds_aupro_alone": t_aupro, "max_abs_difference": diff, "metrics": ours}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
