import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from urd.model.anomaly_map import AnomalyMap, GaussianBlur, image_score


def _teacher(size=128, channels=(8, 16, 32)):
    return [torch.rand(1, c, size // s, size // s) + 0.1 for c, s in zip(channels, (4, 8, 16))]


def test_identical_features_give_an_all_zero_map():
    t = _teacher()
    amap = AnomalyMap(128)(t, [x.clone() for x in t])
    assert amap.shape == (1, 1, 128, 128)
    assert amap.abs().max().item() < 1e-5


@pytest.mark.parametrize("scale", [0, 1, 2])
def test_perturbed_feature_location_is_where_the_map_peaks(scale):
    size = 128
    t = _teacher(size)
    s = [x.clone() for x in t]
    grid = s[scale].shape[-1]
    h, w = grid // 4, (3 * grid) // 4
    s[scale][0, :, h, w] = torch.rand(s[scale].shape[1]) * -1  # a different direction at one cell
    amap = AnomalyMap(size)(t, s)[0, 0]
    peak = np.unravel_index(amap.argmax().item(), amap.shape)
    # bilinear with align_corners=True maps cell k to pixel k * (size - 1) / (grid - 1)
    expected = (h * (size - 1) / (grid - 1), w * (size - 1) / (grid - 1))
    assert abs(peak[0] - expected[0]) <= 2 and abs(peak[1] - expected[1]) <= 2
    assert image_score(amap[None, None]).item() == pytest.approx(amap.max().item())


@pytest.mark.parametrize("border", ["mirror", "reflect"])
def test_blur_matches_scipy_in_both_border_modes(border):
    x = torch.rand(2, 1, 64, 48)
    ours = GaussianBlur(4.0, border)(x).numpy()
    for i in range(2):
        ref = gaussian_filter(x[i, 0].double().numpy(), sigma=4.0, mode=border, truncate=4.0)
        np.testing.assert_allclose(ours[i, 0], ref, atol=1e-5)
    other = "reflect" if border == "mirror" else "mirror"
    assert not np.allclose(ours[0, 0, :2], gaussian_filter(x[0, 0].double().numpy(), sigma=4.0, mode=other, truncate=4.0)[:2], atol=1e-5)
    with pytest.raises(ValueError, match="mirror"):
        GaussianBlur(4.0, "wrap")


def test_map_is_sum_of_three_scales_before_blur():
    t = _teacher(64)
    s = [torch.rand_like(x) for x in t]
    unblurred = AnomalyMap(64, sigma=0.0)(t, s)
    total = 0
    for a, b in zip(t, s):
        d = (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).unsqueeze(1)
        total = total + torch.nn.functional.interpolate(d, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(unblurred, total)
    assert unblurred.max() <= 3.0 + 1e-6


def test_map_stays_fp32_under_bf16_autocast():
    t = _teacher(64)
    s = [x + 0.3 * torch.rand_like(x) for x in t]
    bf16 = [x.bfloat16() for x in t], [x.bfloat16() for x in s]  # what a bf16 network hands over
    reference = AnomalyMap(64, sigma=2.0)(*[[x.float() for x in group] for group in bf16])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amap = AnomalyMap(64, sigma=2.0)(*bf16)
    assert amap.dtype == torch.float32  # the blur's convolutions would run in bf16 under autocast otherwise
    assert torch.allclose(amap, reference, atol=1e-6)
