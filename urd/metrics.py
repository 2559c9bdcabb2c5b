"""Detection and localisation metrics: image/pixel AUROC and AP, standard AUPRO, F1-max.

Image-level metrics call scikit-learn directly. Pixel-level metrics over a whole category
(~150 images x 256^2 = 10M pixels) are computed from one descending sort of all pixel scores,
shared by AUROC, AP, F1-max and AUPRO: scikit-learn would sort the same 10M values once per metric
and cannot compute AUPRO. The curve construction follows scikit-learn's (one point per distinct
score), and the results agree with it to floating-point precision (tests/test_metrics.py).

AUPRO is the standard MVTec AD definition: connected components (8-connectivity) of every
ground-truth mask of the test set; FPR = share of all anomaly-free pixels of the test set at or
above the threshold; PRO = mean over components of the share of the component at or above it;
the PRO-vs-FPR curve is integrated up to FPR = ``limit`` (interpolated there) and divided by it.

A test split of a few dozen images pins image AUROC down to several points only, so the report
carries a bootstrap confidence interval for it (:func:`auroc_interval`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap, rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


@dataclass
class Curve:
    """Cumulative counts at each distinct score, from the highest score down."""

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray

    @property
    def positives(self) -> float:
        return float(self.tps[-1]) if len(self.tps) else 0.0

    @property
    def negatives(self) -> float:
        return float(self.fps[-1]) if len(self.fps) else 0.0


def _distinct_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Indices of the last element of each run of equal scores in a descending array."""
    if sorted_scores.size == 0:
        return np.zeros(0, np.int64)
    return np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]


def _order(scores: np.ndarray) -> np.ndarray:
    # Not a stable sort (about 2x faster): the curves only read the last index of each run of
    # equal scores, so the order within ties does not matter.
    return np.argsort(-scores)


def binary_curve(scores: np.ndarray, labels: np.ndarray, order: np.ndarray | None = None) -> Curve:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = _order(scores) if order is None else order
    s = scores[order]
    ends = _distinct_ends(s)
    tps = np.cumsum(labels[order], dtype=np.float64)[ends]
    fps = (ends + 1) - tps
    return Curve(s[ends], tps, fps)


def curve_auroc(curve: Curve) -> float:
    if curve.positives == 0 or curve.negatives == 0:
        return float("nan")
    tpr = np.r_[0.0, curve.tps / curve.positives]
    fpr = np.r_[0.0, curve.fps / curve.negatives]
    return float(np.trapezoid(tpr, fpr))


def curve_ap(curve: Curve) -> float:
    """Average precision as scikit-learn defines it: sum over thresholds of (R_n - R_{n-1}) P_n."""
    if curve.positives == 0:
        return float("nan")
    precision = curve.tps / (curve.tps + curve.fps)
    recall = curve.tps / curve.positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def curve_f1_max(curve: Curve) -> tuple[float, float]:
    """Best F1 over thresholds and the threshold (score >= threshold is a defect)."""
    if curve.positives == 0:
        return float("nan"), float("nan")
    precision = curve.tps / (curve.tps + curve.fps)
    recall = curve.tps / curve.positives
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(curve.thresholds[best])


def component_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of N x H x W binary masks, numbered across the
    whole set (0 = background) -> (N x H x W int32 labels, number of components)."""
    out = np.zeros(masks.shape, np.int32)
    offset = 0
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        out[i] = np.where(labels > 0, labels + offset, 0)
        offset += count - 1
    return out, offset


def integrate_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid integral of y(x) from 0 to ``limit`` (x ascending, starting at 0), interpolating
    y at ``limit``, divided by ``limit``."""
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    if xs[-1] < limit and inside.sum() < x.size:
        j = int(inside.sum())  # first point beyond the limit
        y_limit = ys[-1] + (y[j] - ys[-1]) * (limit - xs[-1]) / (x[j] - xs[-1])
        xs, ys = np.r_[xs, limit], np.r_[ys, y_limit]
    return float(np.trapezoid(ys, xs) / limit)


def pro_curve(scores: np.ndarray, masks: np.ndarray, fpr_limit: float | None = None, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, from (0, 0) upwards.

    With ``fpr_limit`` only the pixels needed to reach that FPR are sorted (a partition finds the
    score where it is reached), which makes AUPRO alone several times faster than a full sort.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(masks.shape)
    labels, n_components = component_labels(masks.astype(bool))
    if n_components == 0:
        raise ValueError("AUPRO needs at least one anomalous region in the ground truth")
    flat_scores = scores.ravel()
    flat_labels = labels.ravel()
    normal = flat_labels == 0
    n_normal = int(normal.sum())
    if n_normal == 0:
        raise ValueError("AUPRO needs anomaly-free pixels")
    sizes = np.bincount(flat_labels, minlength=n_components + 1).astype(np.float64)
    if order is None:
        keep = np.arange(flat_scores.size)
        if fpr_limit is not None:
            k = min(n_normal, int(np.ceil(fpr_limit * n_normal)))
            cut = np.partition(flat_scores[normal], n_normal - k)[n_normal - k]  # k-th largest normal score
            keep = np.flatnonzero(flat_scores >= cut)
        order = keep[_order(flat_scores[keep])]
    s = flat_scores[order]
    ends = _distinct_ends(s)
    ordered_labels = flat_labels[order]
    # Each anomalous pixel weighs 1 / (|its component| * K): summing weights above a threshold
    # gives the mean per-component overlap. FPR counts normal pixels over all normal pixels.
    weights = np.where(ordered_labels == 0, 0.0, 1.0 / (sizes[ordered_labels] * n_components))
    fpr = np.cumsum(ordered_labels == 0, dtype=np.float64)[ends] / n_normal
    pro = np.cumsum(weights)[ends]
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(scores: np.ndarray, masks: np.ndarray, limit: float = 0.3, order: np.ndarray | None = None) -> float:
    """Standard (dataset-level) AUPRO up to FPR ``limit``, normalised to [0, 1]."""
    fpr, pro = pro_curve(scores, masks, fpr_limit=limit if order is None else None, order=order)
    return integrate_up_to(fpr, pro, limit)


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.min() == labels.max():
        return {"image_auroc": float("nan"), "image_ap": float("nan"), "image_f1_max": float("nan"), "image_f1_threshold": float("nan")}
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)[:-1]
    best = int(np.argmax(f1))
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "image_ap": float(average_precision_score(labels, scores)),
        "image_f1_max": float(f1[best]),
        "image_f1_threshold": float(thresholds[best]),
    }


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC as the Mann-Whitney statistic, vectorised over leading axes (tied scores count half).

    Equal to roc_auc_score per row; used for the bootstrap, where calling scikit-learn per resample
    costs ~5 ms each. nan for a row with one class only.
    """
    labels = np.asarray(labels).astype(bool)
    ranks = rankdata(scores, axis=-1)
    positives = labels.sum(-1)
    negatives = labels.shape[-1] - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * labels).sum(-1) - positives * (positives + 1) / 2) / (positives * negatives)


def auroc_interval(labels: np.ndarray, scores: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the image AUROC: images resampled with replacement (seeded).

    (nan, nan) when one class is missing. A resample that happens to hold one class only has no
    AUROC and is left out of the percentiles.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.size == 0 or labels.all() or not labels.any():
        return float("nan"), float("nan")
    with warnings.catch_warnings():  # scipy warns on a degenerate distribution (e.g. AUROC 1 in every resample)
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap((labels, scores), lambda y, s, axis=-1: rank_auroc(y, s), paired=True, vectorized=True,
                           n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(result.bootstrap_distribution, [tail, 1 - tail])
    return float(low), float(high)


def pixel_metrics(anomaly_maps: np.ndarray, masks: np.ndarray, pro_limit: float = 0.3) -> dict[str, float]:
    """N x H x W maps and binary masks -> pixel AUROC, AP, F1-max (+ threshold), AUPRO, from one sort."""
    scores = np.asarray(anomaly_maps, dtype=np.float32).ravel()
    masks = np.asarray(masks).astype(bool)
    order = _order(scores)
    curve = binary_curve(scores, masks.ravel(), order)
    f1, threshold = curve_f1_max(curve)
    out = {"pixel_auroc": curve_auroc(curve), "pixel_ap": curve_ap(curve), "pixel_f1_max": f1, "pixel_f1_threshold": threshold}
    out["pixel_aupro"] = aupro(scores, masks, pro_limit, order=order) if masks.any() and not masks.all() else float("nan")
    return out
