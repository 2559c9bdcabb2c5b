"""Thresholds from what reviewers confirmed on the line (the field set), with stated guarantees.

The val quantiles of :mod:`urd.calibrate` hold for normal parts like the val split. Once reviewers
have confirmed good parts and defects, the two thresholds can be set for the errors a factory
counts, each with a one-sided Clopper-Pearson bound at ``confidence``:

* **reject threshold** (``image_threshold``): the lowest score such that the upper bound on the
  share of confirmed-good parts at or above it (false rejects) is at most ``max_false_reject``;
* **review threshold** (the accept edge): the highest score such that the upper bound on the share
  of confirmed defects below it (escapes: accepted without a look) is at most ``max_escape``;
* the **review band** between them is checked against the reviewers' capacity: its expected load
  (the share of recent production parts that fall in it, times the parts per shift) must fit
  ``review_capacity``. Spare capacity lowers the review threshold further (fewer escapes) until the
  band is full; a band over capacity is reported, never fixed by breaking a bound.

A bound needs enough parts: with no errors at all, ``n`` parts bound a rate only down to
``1 - (1 - confidence) ** (1 / n)`` (299 good parts for 1% at 95%, 59 defects for 5%); with fewer
the calibration refuses and says how many are missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import beta


def clopper_pearson_upper(k: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound on a rate after ``k`` events in ``n`` trials."""
    if n <= 0 or k >= n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def largest_allowed_count(n: int, target: float, confidence: float) -> int:
    """The most events out of ``n`` whose upper bound is still at most ``target`` (-1: none is)."""
    # the bound grows with k: walk up from 0 (n is at most a few thousand reviewed parts)
    k = -1
    while k + 1 < n and clopper_pearson_upper(k + 1, n, confidence) <= target:
        k += 1
    return k


def parts_needed(target: float, confidence: float) -> int:
    """Parts with no error needed before a rate can be bounded by ``target``."""
    return int(np.ceil(np.log(1 - confidence) / np.log(1 - target)))


@dataclass
class FieldCalibration:
    image_threshold: float  # reject at or above
    review_threshold: float  # accept below
    confidence: float
    good_parts: int
    defect_parts: int
    false_rejects: int  # confirmed-good parts at or above the reject threshold
    false_reject_bound: float
    escapes: int  # confirmed defects below the review threshold
    escape_bound: float
    review_share: float  # share of the production parts that fall in the band
    reviews_per_shift: float | None
    review_capacity: int | None
    fits_capacity: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NotEnoughVerdicts(ValueError):
    pass


def calibrate_from_verdicts(
    good_scores: np.ndarray,
    defect_scores: np.ndarray,
    max_false_reject: float,
    max_escape: float,
    confidence: float = 0.95,
    production_scores: np.ndarray | None = None,
    parts_per_shift: float | None = None,
    review_capacity: int | None = None,
) -> FieldCalibration:
    """Reject and review thresholds from confirmed-good and confirmed-defect scores (see the module
    docstring). ``production_scores``: recent scores of the line (all parts), for the band's load;
    default the confirmed-good scores."""
    good = np.sort(np.asarray(good_scores, np.float64))
    defects = np.sort(np.asarray(defect_scores, np.float64))
    missing = []
    k_max = largest_allowed_count(len(good), max_false_reject, confidence)
    if k_max < 0:
        missing.append(f"{parts_needed(max_false_reject, confidence) - len(good)} more confirmed-good parts (have {len(good)}) to bound "
                       f"false rejects at {max_false_reject:g}")
    j_max = largest_allowed_count(len(defects), max_escape, confidence)
    if j_max < 0:
        missing.append(f"{parts_needed(max_escape, confidence) - len(defects)} more confirmed defects (have {len(defects)}) to bound "
                       f"escapes at {max_escape:g}")
    if missing:
        raise NotEnoughVerdicts(f"calibration from verdicts at {confidence:.0%} confidence needs " + " and ".join(missing) +
                                "; until then the val calibration stays (review more parts, or loosen the targets)")
    # reject: just above the (k_max + 1)-th highest good score, so at most k_max goods are at or above it
    reject = float(np.nextafter(good[len(good) - 1 - k_max], np.inf))
    # accept below the (j_max + 1)-th lowest defect score: at most j_max defects are below it
    review = min(float(defects[j_max]), reject)
    production = np.sort(np.asarray(production_scores if production_scores is not None else good, np.float64))

    def band_share(low: float) -> float:  # share of production scores in [low, reject), by bisection of the sorted scores
        if not len(production):
            return 0.0
        return float(np.searchsorted(production, reject, "left") - np.searchsorted(production, low, "left")) / len(production)

    per_shift = None
    fits = True
    if parts_per_shift is not None and review_capacity is not None:
        capacity_share = review_capacity / max(parts_per_shift, 1e-12)
        fits = band_share(review) <= capacity_share
        if fits:  # spare capacity: lower the accept edge over production scores while the band still fits
            for low in production[production < review][::-1]:
                if band_share(float(low)) > capacity_share:
                    break
                review = float(low)
        per_shift = band_share(review) * parts_per_shift
    false_rejects = int((good >= reject).sum())
    escapes = int((defects < review).sum())
    return FieldCalibration(
        image_threshold=reject, review_threshold=review, confidence=confidence, good_parts=len(good), defect_parts=len(defects),
        false_rejects=false_rejects, false_reject_bound=clopper_pearson_upper(false_rejects, len(good), confidence),
        escapes=escapes, escape_bound=clopper_pearson_upper(escapes, len(defects), confidence), review_share=band_share(review),
        reviews_per_shift=per_shift, review_capacity=review_capacity, fits_capacity=fits,
    )
