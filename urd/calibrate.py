"""Thresholds and score normalisation from held-out data (never the test split).

* Without labelled anomalies: the image threshold is the (1 - ``target_fpr``) quantile of the val
  normals' image scores, the pixel threshold the (1 - ``pixel_target_fpr``) quantile of their
  pixels; a normal part is then flagged at about the target rate.
* The review threshold, the lower edge of the review band, is the (1 - ``review_target_fpr``)
  quantile of the val normals' image scores (never above the image threshold): a part scoring
  below it is accepted, from it up to the image threshold it goes to a reviewer, at or above the
  image threshold it is rejected (:func:`decide`).
* With a labelled calibration set (defect images the user provides, never test images): the
  F1-optimal thresholds on val normals + those defects.

With ``n`` val images the image threshold can only resolve false-positive rates in steps of 1/n:
a target below 1/n makes the threshold the val maximum, and the rate on new normal parts is then
only known to be around 1/n or below (``image_fpr_resolution``; the model card says so).

* With a field set (confirmed defects from the line, :mod:`urd.field_calibration`): the reject
  threshold bounds the share of good parts (the val normals) at or above it by
  ``max_false_reject``, the review threshold bounds the share of confirmed defects accepted
  without review by ``max_escape``, both with one-sided Clopper-Pearson bounds at ``confidence``,
  the band sized to ``review_capacity``. Too few parts for a bound: the val thresholds stay and
  the calibration says how many reviews are missing (``field.status`` "waiting").

Scores are normalised as ``clip((s - threshold) / (max - min) + 0.5, 0, 1)`` with min/max of the
calibration scores, so the threshold maps to exactly 0.5 and every score to [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import CalibrateParams
from .field_calibration import NotEnoughVerdicts, calibrate_from_verdicts
from .files import CALIBRATION_FILE, atomic_write_text
from .metrics import binary_curve, curve_f1_max


def normalize_scores(scores: np.ndarray, threshold: float, low: float, high: float) -> np.ndarray:
    """Map ``threshold`` to 0.5 and clip to [0, 1] (works for image scores and anomaly maps)."""
    return np.clip((np.asarray(scores, np.float64) - threshold) / max(high - low, 1e-12) + 0.5, 0.0, 1.0)


DECISIONS = ("accept", "review", "reject")


def decide(score: float, review_threshold: float, image_threshold: float) -> str:
    """The three-way decision of an image score: reject at or above ``image_threshold``, review at
    or above ``review_threshold``, accept below."""
    if score >= image_threshold:
        return "reject"
    return "review" if score >= review_threshold else "accept"


def review_threshold(calibration: dict[str, Any]) -> float:
    """The review band's lower edge of a calibration (older calibrations have none: no band)."""
    return float(calibration.get("review_threshold", calibration["image_threshold"]))


def calibrate(
    params: CalibrateParams,
    val_scores: np.ndarray,
    val_maps: np.ndarray,
    anomaly_scores: np.ndarray | None = None,
    anomaly_maps: np.ndarray | None = None,
    anomaly_masks: np.ndarray | None = None,
    field_scores: np.ndarray | None = None,
) -> dict[str, Any]:
    """Thresholds + normalisation constants. ``val_*``: held-out normal images; ``anomaly_*``: an
    optional labelled calibration set of defect images (maps and masks for the pixel threshold);
    ``field_scores``: the image scores of the field set's confirmed defects."""
    if len(val_scores) == 0:
        raise ValueError("calibration needs val images (held-out normals); dataset.val_fraction is 0 or the val split is empty")
    val_scores = np.asarray(val_scores, np.float64)
    if anomaly_scores is None or len(anomaly_scores) == 0:
        image_threshold = float(np.quantile(val_scores, 1 - params.target_fpr, method="higher"))
        pixel_threshold = float(np.quantile(val_maps.ravel(), 1 - params.pixel_target_fpr, method="higher"))
        method = "val_quantile"
        all_scores, all_maps = val_scores, val_maps
    else:
        labels = np.r_[np.zeros(len(val_scores)), np.ones(len(anomaly_scores))]
        all_scores = np.r_[val_scores, np.asarray(anomaly_scores, np.float64)]
        _, image_threshold = curve_f1_max(binary_curve(all_scores, labels))
        all_maps = np.concatenate([val_maps, anomaly_maps]) if anomaly_maps is not None else val_maps
        if anomaly_masks is not None and np.asarray(anomaly_masks).any():
            pixel_labels = np.concatenate([np.zeros(val_maps.shape, bool), np.asarray(anomaly_masks, bool)])
            _, pixel_threshold = curve_f1_max(binary_curve(all_maps.ravel(), pixel_labels.ravel()))
        else:
            pixel_threshold = float(np.quantile(val_maps.ravel(), 1 - params.pixel_target_fpr, method="higher"))
        method = "f1_calibration_set"
    review = min(float(np.quantile(val_scores, 1 - params.review_target_fpr, method="higher")), float(image_threshold))
    field: dict[str, Any] | None = None
    if field_scores is not None and len(field_scores):
        try:
            verdicts = calibrate_from_verdicts(val_scores, field_scores, params.max_false_reject, params.max_escape, params.confidence,
                                               parts_per_shift=params.parts_per_shift, review_capacity=params.review_capacity)
        except NotEnoughVerdicts as exc:
            field = {"status": "waiting", "reason": str(exc), "good_parts": int(len(val_scores)), "defect_parts": int(len(field_scores))}
        else:
            image_threshold, review, method = verdicts.image_threshold, verdicts.review_threshold, "field_verdicts"
            field = {"status": "calibrated", **verdicts.as_dict()}
        all_scores = np.r_[all_scores, np.asarray(field_scores, np.float64)]
    return {
        "method": method,
        "target_fpr": params.target_fpr,
        "pixel_target_fpr": params.pixel_target_fpr,
        "image_threshold": float(image_threshold),
        "review_target_fpr": params.review_target_fpr,
        "review_threshold": review,
        "pixel_threshold": float(pixel_threshold),
        "image_min": float(all_scores.min()),
        "image_max": float(max(all_scores.max(), image_threshold)),
        "pixel_min": float(all_maps.min()),
        "pixel_max": float(max(all_maps.max(), pixel_threshold)),
        "val_images": int(len(val_scores)),
        "image_fpr_resolution": 1.0 / len(val_scores),
        "calibration_anomalies": 0 if anomaly_scores is None else int(len(anomaly_scores)),
        "val_false_positive_rate": float((val_scores >= image_threshold).mean()),
        "val_review_rate": float(((val_scores >= review) & (val_scores < image_threshold)).mean()),
        "field": field,  # None: no field set
        # the reference distribution a service compares the line's scores with
        "val_scores": [round(float(s), 6) for s in np.sort(val_scores)],
    }


def calibrate_model(model_dir, manifest, params: CalibrateParams, calibration_rows=None, field_rows=None, device: str = "cpu",
                    progress: bool = True) -> dict[str, Any]:
    """Calibrate the model in ``model_dir`` on the val split of ``manifest`` (+ an optional labelled
    calibration set, and the field set, both given as manifest rows) and write ``calibration.json``
    next to the model."""
    import json
    from pathlib import Path

    import torch

    from .checkpoint import load_model
    from .scoring import score_images

    graph, meta = load_model(model_dir, device)
    size = meta["preprocessing"]["image_size"]
    val = manifest[manifest["split"] == "val"]
    val_maps, val_scores, _ = score_images(graph, val, size, torch.device(device), progress=progress, desc="calibrate (val)")
    anomaly = {}
    if calibration_rows is not None and len(calibration_rows):
        test_hashes = set(manifest.loc[manifest["split"] == "test", "sha256"])
        shared = calibration_rows[calibration_rows["sha256"].isin(test_hashes)]
        if len(shared):
            raise ValueError(
                f"{len(shared)} calibration images are also test images (e.g. {shared['path'].iloc[0]}); thresholds are "
                "never set on the test split. Use defect images that are not in the test set."
            )
        defects = calibration_rows[calibration_rows["label"] == 1]
        maps, scores, masks = score_images(graph, defects, size, torch.device(device), progress=progress, desc="calibrate (defects)")
        anomaly = {"anomaly_scores": scores, "anomaly_maps": maps, "anomaly_masks": masks}
    if field_rows is not None and len(field_rows):
        # the field set holds parts from the line; a test image there would leak the test split into the thresholds
        shared = field_rows[field_rows["sha256"].isin(set(manifest.loc[manifest["split"] == "test", "sha256"]))]
        if len(shared):
            raise ValueError(f"{len(shared)} field-set images are also test images (e.g. {shared['path'].iloc[0]}); thresholds are never set on "
                             "the test split. Remove them from the field set (and its rows from harvests.csv).")
        _, anomaly["field_scores"], _ = score_images(graph, field_rows, size, torch.device(device), progress=progress, desc="calibrate (field set)")
    result = calibrate(params, val_scores, val_maps, **anomaly)
    atomic_write_text(Path(model_dir) / CALIBRATION_FILE, json.dumps(result, indent=2) + "\n")
    return result
