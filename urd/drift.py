"""Is the line still seeing what the model was calibrated on?

Three views of a recent stretch of production against the model's reference (its val split):

* **scores**: a two-sample Kolmogorov-Smirnov test (scipy) of the recent image scores against the
  val scores stored in the bundle, and the population stability index (PSI) over the val scores'
  deciles as a second, effect-size view;
* **flag rate**: the share of parts at or above the review threshold against the share of val
  images there, by a one-sided exact binomial test against the *upper* 99% Clopper-Pearson bound
  of the val share. The expectation is itself an estimate from a few hundred val images and stays
  fixed for the model's life: against the plain val share, one unlucky val draw raised 54 alarms
  in 200 stable stretches at alpha 0.05, and Fisher's exact test (both samples random) still 29,
  since the reference does not change between assessments;
* **image statistics** (brightness, contrast, sharpness per image, from the pixels alone): KS
  tests against the training images' statistics. A shift here says the camera or the lighting
  changed; a score shift without one says the parts changed; a flag rate above the calibration's
  promise alone says the thresholds do not hold on this line (cause "flag rate").

:func:`assess` runs them together at one family-wise ``alpha`` (Bonferroni over the tests of one
assessment; the caller divides a daily false-alarm budget over the assessments of a day, e.g.
hourly runs times cameras).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy.stats import binomtest, ks_2samp

from .field_calibration import clopper_pearson_upper
from .files import atomic_write_text

REFERENCE_FILE = "reference.json"  # in a bundle: the training images' statistics

IMAGE_STATISTICS = ("brightness", "contrast", "sharpness")


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """Brightness (mean grey level), contrast (its standard deviation) and sharpness (variance of
    the Laplacian) of an H x W x 3 uint8 RGB image."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    mean, std = cv2.meanStdDev(grey)
    return {"brightness": float(mean[0, 0]), "contrast": float(std[0, 0]), "sharpness": float(cv2.Laplacian(grey, cv2.CV_64F).var())}


def population_stability_index(reference: np.ndarray, recent: np.ndarray, bins: int = 10, floor: float = 1e-4) -> float:
    """PSI = sum (p_recent - p_ref) * ln(p_recent / p_ref) over the reference's quantile bins
    (shares floored at ``floor`` so an empty bin counts as rare, not impossible)."""
    reference, recent = np.asarray(reference, np.float64), np.asarray(recent, np.float64)
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    p_ref = np.maximum(np.histogram(reference, edges)[0] / len(reference), floor)
    p_new = np.maximum(np.histogram(recent, edges)[0] / len(recent), floor)
    return float(np.sum((p_new - p_ref) * np.log(p_new / p_ref)))


def flag_rate_pvalue(flagged: int, parts: int, reference_flagged: int, reference_parts: int, reference_confidence: float = 0.99) -> float:
    """One-sided p-value that the recent flag rate exceeds what the reference allows: a binomial
    test against the upper ``reference_confidence`` bound of the reference's rate."""
    if not parts or not reference_parts:
        return 1.0
    expected = clopper_pearson_upper(reference_flagged, reference_parts, reference_confidence)
    return float(binomtest(flagged, parts, expected, alternative="greater").pvalue)


@dataclass
class Assessment:
    drift: bool
    cause: str  # "none" | "camera or lighting" | "parts" | "flag rate" (only the flag rate: more parts flagged than calibrated)
    alpha_per_test: float
    evidence: dict[str, Any] = field(default_factory=dict)


def assess(
    reference_scores: np.ndarray,
    recent_scores: np.ndarray,
    review_threshold: float,
    reference_image_stats: dict[str, np.ndarray] | None = None,
    recent_image_stats: dict[str, np.ndarray] | None = None,
    alpha: float = 1e-3,
) -> Assessment:
    """One assessment of a recent stretch (see the module docstring)."""
    reference_scores, recent_scores = np.asarray(reference_scores, np.float64), np.asarray(recent_scores, np.float64)
    stats = [s for s in IMAGE_STATISTICS if reference_image_stats and recent_image_stats and s in reference_image_stats and s in recent_image_stats]
    tests = 2 + len(stats)
    alpha_each = alpha / tests
    ks = ks_2samp(reference_scores, recent_scores)
    flagged, reference_flagged = int((recent_scores >= review_threshold).sum()), int((reference_scores >= review_threshold).sum())
    evidence: dict[str, Any] = {
        "parts": int(len(recent_scores)),
        "scores": {"ks_statistic": float(ks.statistic), "p_value": float(ks.pvalue),
                   "psi": population_stability_index(reference_scores, recent_scores),
                   "median": float(np.median(recent_scores)), "reference_median": float(np.median(reference_scores))},
        "flag_rate": {"flagged": flagged, "rate": flagged / max(len(recent_scores), 1), "expected": reference_flagged / len(reference_scores),
                      "p_value": flag_rate_pvalue(flagged, len(recent_scores), reference_flagged, len(reference_scores))},
        "images": {},
    }
    for name in stats:
        ref, new = np.asarray(reference_image_stats[name], np.float64), np.asarray(recent_image_stats[name], np.float64)
        test = ks_2samp(ref, new)
        evidence["images"][name] = {"p_value": float(test.pvalue), "ks_statistic": float(test.statistic), "median": float(np.median(new)),
                                    "reference_median": float(np.median(ref)),
                                    "relative_change": float(np.median(new) / np.median(ref) - 1) if np.median(ref) else float("nan")}
    images_shifted = any(v["p_value"] < alpha_each for v in evidence["images"].values())
    distribution_shifted = evidence["scores"]["p_value"] < alpha_each
    flag_rate_high = evidence["flag_rate"]["p_value"] < alpha_each
    # a flag rate above the calibration's promise with the scores' distribution unchanged (to the KS
    # test) says the thresholds do not hold on this line, e.g. a val split too small to calibrate on
    cause = "camera or lighting" if images_shifted else "parts" if distribution_shifted else "flag rate" if flag_rate_high else "none"
    return Assessment(images_shifted or distribution_shifted or flag_rate_high, cause, alpha_each, evidence)


LINE_REFERENCE_MIN = 20  # confirmed-good parts of one harvest that make it the picture of the line


def write_reference(bundle_dir: str | Path, manifest, limit: int = 500, dataset_root: str | Path | None = None,
                    category: str | None = None) -> dict[str, Any]:
    """Store the image statistics of the images a drift monitor compares the line's with: the
    training split (up to ``limit`` images), or, when the newest harvest of the category
    (``dataset_root``/``category``/harvests.csv) brought at least LINE_REFERENCE_MIN confirmed-good
    parts into training, those: what reviewers confirmed the line looks like now. After a lighting
    change and the retrain on its reviewed parts, the monitor then watches the new lighting
    instead of raising the old change again."""
    from .data.field import PROVENANCE, read_rows
    from .data.images import read_image

    train = manifest[manifest["split"] == "train"].sort_values("path")
    source = "train split"
    if dataset_root is not None and category is not None:
        harvested = [r for r in read_rows(Path(dataset_root) / category / PROVENANCE) if r.get("verdict", "good") == "good" and r.get("harvest_id")]
        if harvested:
            newest = max(harvested, key=lambda r: r.get("inspected_at", ""))["harvest_id"]
            names = {r["file"] for r in harvested if r["harvest_id"] == newest}
            line = train[train["path"].map(lambda p: Path(p).name in names)]
            if len(line) >= LINE_REFERENCE_MIN:
                train, source = line, f"harvest {newest} ({len(line)} confirmed-good parts from the line)"
    per = [image_statistics(read_image(path)) for path in train["path"].head(limit)]
    reference = {"images": len(per), "source": source, "image_statistics": {k: [round(p[k], 4) for p in per] for k in IMAGE_STATISTICS}}
    atomic_write_text(Path(bundle_dir) / REFERENCE_FILE, json.dumps(reference) + "\n")
    return reference


def read_reference(bundle_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The training images' statistics of a bundle (None for a bundle packaged without them)."""
    file = Path(bundle_dir) / REFERENCE_FILE
    if not file.is_file():
        return None
    return {k: np.asarray(v, np.float64) for k, v in json.loads(file.read_text())["image_statistics"].items()}
