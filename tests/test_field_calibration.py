"""Thresholds from reviewers' verdicts: Clopper-Pearson bounds against scipy's exact binomial test,
the thresholds against a brute-force search over every candidate, the review band against the
reviewers' capacity, and refusals when there are too few verdicts."""

import numpy as np
import pytest
from scipy.stats import binomtest

from urd.field_calibration import NotEnoughVerdicts, calibrate_from_verdicts, clopper_pearson_upper, parts_needed


@pytest.mark.parametrize("k,n", [(0, 10), (0, 300), (3, 300), (7, 59), (59, 60)])
def test_clopper_pearson_upper_bound_equals_scipys_exact_interval(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high  # two-sided 90% = one-sided 95%
    assert clopper_pearson_upper(k, n, 0.95) == pytest.approx(expected, rel=1e-9)
    assert clopper_pearson_upper(n, n, 0.95) == 1.0


def test_parts_needed_is_the_smallest_count_with_a_bound_under_the_target():
    for target in (0.01, 0.05):
        n = parts_needed(target, 0.95)
        assert clopper_pearson_upper(0, n, 0.95) <= target < clopper_pearson_upper(0, n - 1, 0.95)
    assert parts_needed(0.01, 0.95) == 299 and parts_needed(0.05, 0.95) == 59


def brute_force(good, defects, max_fr, max_esc, conf, production=None, per_shift=None, capacity=None):
    candidates = np.unique(np.r_[good, defects, np.nextafter(good, np.inf), np.nextafter(defects, np.inf)])
    reject = min(t for t in candidates if clopper_pearson_upper(int((good >= t).sum()), len(good), conf) <= max_fr)
    review = min(max(t for t in candidates if clopper_pearson_upper(int((defects < t).sum()), len(defects), conf) <= max_esc), reject)
    if capacity is not None:
        production = good if production is None else production
        share = lambda low: ((production >= low) & (production < reject)).mean()  # noqa: E731
        if share(review) <= capacity / per_shift:
            review = min([review] + [t for t in production if t < review and share(t) <= capacity / per_shift])
    return reject, review


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_meet_their_bounds_and_equal_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    good = rng.normal(0, 1, 400)
    defects = rng.normal(3, 1, 120)
    c = calibrate_from_verdicts(good, defects, max_false_reject=0.02, max_escape=0.1)
    assert (c.image_threshold, c.review_threshold) == brute_force(good, defects, 0.02, 0.1, 0.95)
    assert c.false_reject_bound <= 0.02 and c.escape_bound <= 0.1 and c.review_threshold <= c.image_threshold
    assert c.false_rejects == int((good >= c.image_threshold).sum()) and c.escapes == int((defects < c.review_threshold).sum())
    # the reject threshold is the lowest that keeps the bound: a step lower breaks it
    below = np.max(good[good < c.image_threshold])
    assert clopper_pearson_upper(int((good >= below).sum()), len(good), 0.95) > 0.02


@pytest.mark.parametrize("capacity", [5, 40, 400])
def test_the_review_band_is_sized_to_the_reviewers_capacity(capacity):
    rng = np.random.default_rng(7)
    good, defects, production = rng.normal(0, 1, 600), rng.normal(2.5, 1, 150), rng.normal(0.1, 1.1, 2000)
    c = calibrate_from_verdicts(good, defects, 0.02, 0.1, production_scores=production, parts_per_shift=1000, review_capacity=capacity)
    assert (c.image_threshold, c.review_threshold) == brute_force(good, defects, 0.02, 0.1, 0.95, production, 1000, capacity)
    plain = calibrate_from_verdicts(good, defects, 0.02, 0.1)
    assert c.image_threshold == plain.image_threshold and c.review_threshold <= plain.review_threshold  # spare capacity only lowers the accept edge
    if c.fits_capacity:
        assert c.reviews_per_shift <= capacity
    else:  # over capacity: the bounds are kept and the shortfall is reported
        assert c.review_threshold == plain.review_threshold and c.reviews_per_shift > capacity
    assert c.escape_bound <= 0.1


def test_too_few_verdicts_are_refused_saying_how_many_are_missing():
    rng = np.random.default_rng(0)
    with pytest.raises(NotEnoughVerdicts, match="199 more confirmed-good parts .* and 39 more confirmed defects"):
        calibrate_from_verdicts(rng.normal(0, 1, 100), rng.normal(3, 1, 20), max_false_reject=0.01, max_escape=0.05)
