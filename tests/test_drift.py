"""Drift statistics: PSI by hand, the flag-rate test against scipy, image statistics on images with
known brightness, contrast and sharpness, and assessments that tell a lighting change from a change
of the parts and stay quiet on a stable stretch."""

import cv2
import numpy as np
import pytest

from urd.drift import assess, flag_rate_pvalue, image_statistics, population_stability_index


def test_psi_by_hand():
    reference = np.arange(100, dtype=float)  # deciles at 0, 9.9, ..., 99
    assert population_stability_index(reference, reference) == pytest.approx(0.0)
    shifted = np.r_[np.full(20, 5.0), np.full(80, 95.0)]  # 20% in the first decile, 80% in the last
    expected = (0.2 - 0.1) * np.log(0.2 / 0.1) + (0.8 - 0.1) * np.log(0.8 / 0.1) + 8 * (1e-4 - 0.1) * np.log(1e-4 / 0.1)
    assert population_stability_index(reference, shifted) == pytest.approx(expected)


def test_flag_rate_pvalue_is_the_binomial_tail_above_the_references_upper_bound():
    from scipy.stats import binom

    from urd.field_calibration import clopper_pearson_upper

    bound = clopper_pearson_upper(4, 400, 0.99)  # 4 of 400 val images flagged: the rate is at most ~2.6%
    assert 0.01 < bound < 0.03
    assert flag_rate_pvalue(12, 200, 4, 400) == pytest.approx(binom.sf(11, 200, bound))
    assert flag_rate_pvalue(0, 0, 4, 400) == 1.0 and flag_rate_pvalue(2, 200, 4, 400) > 0.5


def test_image_statistics_of_known_images():
    flat = np.full((64, 64, 3), 100, np.uint8)
    s = image_statistics(flat)
    assert s == {"brightness": pytest.approx(100.0), "contrast": pytest.approx(0.0), "sharpness": pytest.approx(0.0)}
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 200
    t = image_statistics(stripes)
    assert t["brightness"] == pytest.approx(100.0, abs=1) and t["contrast"] == pytest.approx(100.0, abs=1)
    assert t["sharpness"] > image_statistics(cv2.GaussianBlur(stripes, (5, 5), 2))["sharpness"] * 10


def _stats(rng, n, gain=1.0):
    images = [np.clip(rng.normal(120, 30, (32, 32, 3)) * gain, 0, 255).astype(np.uint8) for _ in range(n)]
    per = [image_statistics(im) for im in images]
    return {k: np.array([p[k] for p in per]) for k in per[0]}


def test_assessment_tells_lighting_from_parts_and_is_quiet_when_stable():
    rng = np.random.default_rng(0)
    reference = rng.normal(1.0, 0.1, 400)
    review = float(np.quantile(reference, 0.95))
    ref_stats = _stats(rng, 200)
    stable = assess(reference, rng.normal(1.0, 0.1, 300), review, ref_stats, _stats(rng, 100))
    assert not stable.drift and stable.cause == "none" and stable.alpha_per_test == pytest.approx(1e-3 / 5)

    lighting = assess(reference, rng.normal(1.05, 0.1, 300), review, ref_stats, _stats(rng, 100, gain=1.1))
    assert lighting.drift and lighting.cause == "camera or lighting"
    assert lighting.evidence["images"]["brightness"]["relative_change"] == pytest.approx(0.1, abs=0.03)

    parts = assess(reference, rng.normal(1.2, 0.1, 300), review, ref_stats, _stats(rng, 100))
    assert parts.drift and parts.cause == "parts" and parts.evidence["flag_rate"]["rate"] > 0.3

    # the same distribution, only more of it past the review threshold than the reference promised: the thresholds, not the parts
    few_flagged = np.sort(reference)[:380]  # a reference whose own flagged share (about 0) understates the line's (5%)
    calibration = assess(np.r_[few_flagged, few_flagged[-20:]], rng.normal(1.0, 0.1, 2000), float(few_flagged[-1]) + 1e-9, alpha=1e-3)
    assert calibration.drift and calibration.cause == "flag rate" and calibration.evidence["scores"]["p_value"] >= calibration.alpha_per_test


def test_false_alarms_on_stable_stretches_stay_within_alpha():
    """Each model keeps one reference for its life: the alarm rate must hold for a fixed reference,
    over several references."""
    alarms = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        reference = rng.normal(0, 1, 500)
        review = float(np.quantile(reference, 0.95))
        alarms += sum(assess(reference, rng.normal(0, 1, 200), review, alpha=0.05).drift for _ in range(100))
    assert alarms <= 35  # at most 20 of 400 expected at alpha 0.05 (Bonferroni is conservative)


def test_the_reference_is_the_newest_harvest_when_it_brought_enough_parts_else_the_training_split(tmp_path):
    import csv

    import cv2
    import pandas as pd

    from urd.data.field import LABEL_COLUMNS
    from urd.drift import LINE_REFERENCE_MIN, read_reference, write_reference

    good = tmp_path / "data" / "widget" / "train" / "good"
    good.mkdir(parents=True)
    rows, paths = [], []
    for i, (level, harvest) in enumerate([(60, "")] * 30 + [(100, "h1")] * 10 + [(180, "h2")] * LINE_REFERENCE_MIN):
        path = good / f"{i:03d}.png"
        cv2.imwrite(str(path), np.full((16, 16, 3), level, np.uint8))
        paths.append(str(path))
        if harvest:
            rows.append({"file": path.name, "harvest_id": harvest, "verdict": "good", "inspected_at": f"2026-12-0{1 if harvest == 'h1' else 2}T10:00:00"})
    manifest = pd.DataFrame({"path": paths, "split": "train"})
    with (tmp_path / "data" / "widget" / "harvests.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, LABEL_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    plain = write_reference(tmp_path / "a", manifest)
    assert plain["source"] == "train split" and plain["images"] == 30 + 10 + LINE_REFERENCE_MIN
    line = write_reference(tmp_path / "b", manifest, dataset_root=tmp_path / "data", category="widget")
    assert line["source"].startswith("harvest h2") and line["images"] == LINE_REFERENCE_MIN
    assert set(read_reference(tmp_path / "b")["brightness"]) == {180.0}
    # one image short of the minimum: back to the training split
    short = manifest.drop(index=len(manifest) - 1)
    assert write_reference(tmp_path / "c", short, dataset_root=tmp_path / "data", category="widget")["source"] == "train split"
