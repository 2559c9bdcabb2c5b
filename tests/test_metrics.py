import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from urd.metrics import aupro, auroc_interval, image_metrics, integrate_up_to, pixel_metrics, pro_curve, rank_auroc


def _random_case(seed, n=4, size=24):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(1, n):  # image 0 stays anomaly-free
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 7, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.random(masks.shape) + masks * rng.uniform(0, 0.8)
    maps = np.round(maps, 2)  # ties, as real maps have
    return maps, masks


def brute_force_aupro(maps, masks, limit):
    """The definition, threshold by threshold."""
    components = []
    for i, m in enumerate(masks):
        labels, count = ndimage.label(m, structure=np.ones((3, 3)))
        components += [(i, labels == k) for k in range(1, count + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([(above[i] & region).sum() / region.sum() for i, region in components]))
    fprs, pros = np.array(fprs), np.array(pros)
    # integrate up to the limit, interpolating linearly at the limit
    j = np.searchsorted(fprs, limit, side="right")
    x, y = list(fprs[:j]), list(pros[:j])
    if x[-1] < limit and j < len(fprs):
        y.append(y[-1] + (pros[j] - y[-1]) * (limit - x[-1]) / (fprs[j] - x[-1]))
        x.append(limit)
    area = sum((x[k + 1] - x[k]) * (y[k + 1] + y[k]) / 2 for k in range(len(x) - 1))
    return area / limit


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force_definition(seed, limit):
    maps, masks = _random_case(seed)
    expected = brute_force_aupro(maps, masks, limit)
    assert aupro(maps, masks, limit) == pytest.approx(expected, abs=1e-6)
    # the shared-sort path used by pixel_metrics gives the same number
    order = np.argsort(-maps.ravel(), kind="stable")
    assert aupro(maps, masks, limit, order=order) == pytest.approx(expected, abs=1e-6)


def test_aupro_hand_computed_cases():
    masks = np.zeros((2, 8, 8), bool)
    masks[1, 1:3, 1:3] = True
    masks[1, 5:7, 5:7] = True
    perfect = masks.astype(float)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    assert aupro(1 - perfect + 0.01 * np.random.default_rng(0).random(masks.shape), masks) == pytest.approx(0.0, abs=1e-9)
    # finds one of the two regions perfectly, the other sits with the background at score 0
    one = np.zeros_like(perfect)
    one[1, 1:3, 1:3] = 1.0
    # at FPR 0 the PRO is 0.5; the first step to FPR 1 includes everything -> the curve reaches
    # PRO 0.5 immediately and rises linearly to 1 at FPR 1; at 0.3: 0.5 + 0.5 * 0.3 = 0.65
    assert aupro(one, masks, 0.3) == pytest.approx((0.5 + 0.65) / 2)


def test_pixel_metrics_match_sklearn():
    maps, masks = _random_case(7, n=6, size=32)
    out = pixel_metrics(maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    best = max(f1_score(y, s >= t) for t in np.unique(s))
    assert out["pixel_f1_max"] == pytest.approx(best, abs=1e-9)
    assert f1_score(y, s >= out["pixel_f1_threshold"]) == pytest.approx(best, abs=1e-9)
    assert out["pixel_aupro"] == pytest.approx(brute_force_aupro(maps, masks, 0.3), abs=1e-6)


def test_image_metrics_match_sklearn_and_f1_threshold():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    scores = labels * 0.5 + rng.random(50)
    out = image_metrics(labels, scores)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert f1_score(labels, scores >= out["image_f1_threshold"]) == pytest.approx(out["image_f1_max"])
    assert np.isnan(image_metrics(np.zeros(3), np.arange(3.0))["image_auroc"])


def test_pro_curve_and_integration_edges():
    fpr, pro = pro_curve(np.array([[[0.9, 0.1], [0.2, 0.8]]]), np.array([[[1, 0], [0, 1]]], bool))
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 1 and pro[-1] == 1
    assert integrate_up_to(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="anomalous region"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool))


def test_pixel_metrics_on_a_full_category_fit_in_memory():
    import resource
    rng = np.random.default_rng(0)
    maps = rng.random((150, 256, 256), dtype=np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[75:, 100:140, 100:140] = True
    maps[masks] += 0.3
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = pixel_metrics(maps, masks)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert 0.5 < out["pixel_auroc"] <= 1 and 0 < out["pixel_aupro"] <= 1
    assert grown_mb < 2000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_auroc_matches_sklearn_with_ties_and_batches(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random((5, 30)) < 0.4
    scores = np.round(rng.normal(size=(5, 30)) + labels, 1)  # many ties
    expected = [roc_auc_score(y, s) for y, s in zip(labels, scores)]
    np.testing.assert_allclose(rank_auroc(labels, scores), expected, atol=1e-12)
    assert np.isnan(rank_auroc(np.zeros(4, bool), np.arange(4.0)))


def test_auroc_interval_brackets_the_estimate_and_shrinks_with_more_images():
    rng = np.random.default_rng(0)
    small_y = np.r_[np.zeros(16), np.ones(24)]
    small_s = rng.normal(size=40) + small_y
    low, high = auroc_interval(small_y, small_s)
    assert low < roc_auc_score(small_y, small_s) < high
    assert auroc_interval(small_y, small_s) == (low, high)  # seeded
    big_y = np.r_[np.zeros(160), np.ones(240)]
    big_s = rng.normal(size=400) + big_y
    big_low, big_high = auroc_interval(big_y, big_s)
    assert big_low < roc_auc_score(big_y, big_s) < big_high
    assert big_high - big_low < 0.6 * (high - low)  # ~1/sqrt(10) of the width
    assert auroc_interval(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])) == (1.0, 1.0)
    assert all(np.isnan(auroc_interval(np.ones(5), np.arange(5.0))))


def test_every_summary_shows_the_same_headline_numbers():
    from urd.evaluate import HEADLINE, headline

    overall = {"image_auroc": 0.9861, "image_auroc_ci_low": 0.9663, "image_auroc_ci_high": 0.9994, "pixel_auroc": 0.98, "pixel_aupro": float("nan")}
    assert HEADLINE == ("I-AUROC [95% CI]", "P-AUROC", "AUPRO@0.3")
    assert headline(overall) == ["98.6 [96.6-99.9]", "98.0", "-"]  # no masks: no pixel metric, shown as '-'
    assert headline({"image_auroc": 0.5}) == ["50.0", "-", "-"]
