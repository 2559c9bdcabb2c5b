"""Thresholds and score normalisation from the val split."""

import numpy as np
import pytest

from urd.calibrate import calibrate, decide, normalize_scores, review_threshold
from urd.config import CalibrateParams


def test_calibration_quantile_and_normalisation():
    rng = np.random.default_rng(0)
    val_scores = rng.random(200)
    val_maps = rng.random((200, 4, 4))
    c = calibrate(CalibrateParams(target_fpr=0.05, pixel_target_fpr=0.01), val_scores, val_maps)
    assert c["method"] == "val_quantile" and c["image_fpr_resolution"] == pytest.approx(1 / len(val_scores))
    assert 0.03 <= (val_scores >= c["image_threshold"]).mean() <= 0.05
    assert normalize_scores(c["image_threshold"], c["image_threshold"], c["image_min"], c["image_max"]) == pytest.approx(0.5)
    assert normalize_scores(np.array([-5.0, 99.0]), c["image_threshold"], c["image_min"], c["image_max"]).tolist() == [0.0, 1.0]


def test_calibration_with_labelled_anomalies_is_f1_optimal():
    val_scores = np.array([0.1, 0.2, 0.3, 0.35])
    anomaly_scores = np.array([0.4, 0.5, 0.33])
    c = calibrate(CalibrateParams(), val_scores, np.zeros((4, 2, 2)), anomaly_scores, np.ones((3, 2, 2)), np.ones((3, 2, 2), bool))
    assert c["method"] == "f1_calibration_set" and c["image_threshold"] == pytest.approx(0.33)  # F1 6/7: TP 3, FP 1 (0.35)
    assert c["pixel_threshold"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="val"):
        calibrate(CalibrateParams(), np.zeros(0), np.zeros((0, 2, 2)))


def test_review_band_sits_below_the_image_threshold_at_the_looser_target():
    val_scores = np.arange(1, 101, dtype=float)  # 1..100
    c = calibrate(CalibrateParams(target_fpr=0.02, review_target_fpr=0.10), val_scores, np.zeros((100, 2, 2)))
    # "higher" quantiles: 0.98 -> 99, 0.90 -> 91; at most 2% of val normals reach reject, 10% review or reject
    assert c["image_threshold"] == pytest.approx(99.0) and c["review_threshold"] == pytest.approx(91.0)
    assert (val_scores >= c["review_threshold"]).mean() == pytest.approx(0.10)
    assert [decide(s, review_threshold(c), c["image_threshold"]) for s in (90.9, 91.0, 98.9, 99.0)] == ["accept", "review", "review", "reject"]
    # a calibration from before the review band: no band, two-way decisions
    assert review_threshold({"image_threshold": 5.0}) == 5.0 and decide(4.99, 5.0, 5.0) == "accept"
    with pytest.raises(ValueError, match="review_target_fpr"):
        CalibrateParams(target_fpr=0.05, review_target_fpr=0.01)


def test_a_field_set_sets_both_thresholds_with_bounds_or_waits_saying_for_what():
    rng = np.random.default_rng(1)
    val_scores = rng.normal(0, 1, 400)  # good parts
    field = rng.normal(4, 1, 80)  # confirmed defects
    params = CalibrateParams(max_false_reject=0.02, max_escape=0.1, confidence=0.95)
    c = calibrate(params, val_scores, np.zeros((400, 2, 2)), field_scores=field)
    assert c["method"] == "field_verdicts" and c["field"]["status"] == "calibrated"
    # what the bounds promise holds on the scores they were set on, at the stated confidence
    false_rejects, escapes = int((val_scores >= c["image_threshold"]).sum()), int((field < c["review_threshold"]).sum())
    assert (c["field"]["false_rejects"], c["field"]["escapes"]) == (false_rejects, escapes)
    assert c["field"]["false_reject_bound"] <= 0.02 and c["field"]["escape_bound"] <= 0.1
    assert c["review_threshold"] <= c["image_threshold"] and c["image_max"] >= field.max()
    assert c["val_false_positive_rate"] == pytest.approx(false_rejects / 400)
    # 20 defects cannot bound escapes at 10% (29 with none escaping are needed): the val thresholds stay, and it says so
    waiting = calibrate(params, val_scores, np.zeros((400, 2, 2)), field_scores=field[:20])
    plain = calibrate(params, val_scores, np.zeros((400, 2, 2)))
    assert waiting["method"] == "val_quantile" and waiting["field"]["status"] == "waiting" and "9 more confirmed defects" in waiting["field"]["reason"]
    assert (waiting["image_threshold"], waiting["review_threshold"]) == (plain["image_threshold"], plain["review_threshold"])
    assert plain["field"] is None
