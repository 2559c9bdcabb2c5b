import torch
import torch.nn.functional as F

import numpy as np

from urd.model.losses import flat_cosine_distance, student_loss, teacher_loss, teacher_masks

SIZES = [(16, 16), (8, 8), (4, 4)]  # feature grids of a 64x64 image


def mask_at_scale(mask, size):
    return teacher_masks(mask, [tuple(size)])[0]


def _features(channels=(4, 6, 8), batch=2):
    return [torch.randn(batch, c, *hw) for c, hw in zip(channels, SIZES)]


def _block_mask(batch=2):
    mask = torch.zeros(batch, 1, 64, 64)
    mask[:, :, 16:48, 16:32] = 1.0  # aligned to the coarsest 16-pixel grid
    return mask


def test_losses_are_zero_when_features_coincide_and_mask_is_empty():
    f = _features()
    assert teacher_loss(f, f, f, torch.zeros(2, 1, 64, 64)).item() < 1e-6
    assert teacher_loss(f, f, f, torch.zeros(2, 1, 64, 64), expert_anomalous=f).item() < 1e-6
    assert student_loss(f, f, f, f).item() < 1e-6
    assert student_loss(f, None, f, None).item() < 1e-6


def test_teacher_synthetic_term_is_zero_when_distance_equals_mask():
    mask = _block_mask()
    expert, anomalous = [], []
    for (h, w) in SIZES:
        e = torch.zeros(2, 2, h, w)
        e[:, 0] = 1.0  # expert feature points along channel 0 everywhere
        m = mask_at_scale(mask, (h, w)).unsqueeze(1)
        a = torch.cat([1 - m, m], dim=1) * 3.0  # orthogonal (distance 1) inside the mask, parallel outside
        expert.append(e)
        anomalous.append(a)
    loss = teacher_loss(expert, anomalous, expert, mask)
    assert loss.item() < 1e-6
    # With the mask ignored (all zero) the same features must cost the masked share at each scale.
    expected = sum(mask_at_scale(mask, hw).mean().item() for hw in SIZES)
    torch.testing.assert_close(teacher_loss(expert, anomalous, expert, torch.zeros_like(mask)).item(), expected)


def test_mask_is_resized_and_binarised():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :4, :4] = 1.0
    mask[0, 0, 4, 4] = 1.0  # an isolated pixel falls below 0.5 at 4x4
    m = mask_at_scale(mask, (4, 4))
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert m[0, :2, :2].eq(1).all() and m.sum() == 4


def test_each_loss_grows_when_features_are_perturbed():
    f = _features()
    mask = torch.zeros(2, 1, 64, 64)
    noisy = [x + 0.5 * torch.randn_like(x) for x in f]
    noisier = [x + 2.0 * (y - x) for x, y in zip(f, noisy)]
    base_t = teacher_loss(f, f, f, mask)
    assert base_t < teacher_loss(noisy, f, f, mask) < teacher_loss(noisier, f, f, mask)
    assert base_t < teacher_loss(f, noisy, f, mask)
    base_s = student_loss(f, f, f, f)
    assert base_s < student_loss(noisy, f, f, f) < student_loss(noisier, f, f, f)
    assert base_s < student_loss(f, noisy, f, f)
    assert student_loss(f, f, f, None) < student_loss(f, f, f, noisy)


def test_student_loss_uses_flattened_cosine_per_sample():
    s = [torch.randn(3, 4, 5, 5)]
    t = [torch.randn(3, 4, 5, 5)]
    per_sample = 1 - F.cosine_similarity(s[0].reshape(3, -1), t[0].reshape(3, -1), dim=1)
    torch.testing.assert_close(flat_cosine_distance(s[0], t[0]), per_sample.mean())
    # Four terms (S(I_n), S(I_a)) x (T, E); with S(I_a) = S(I_n) and E = T it is 4x one term.
    torch.testing.assert_close(student_loss(s, s, t, t), 4 * per_sample.mean())


def test_teacher_loss_is_per_pixel_l1():
    t_n, t_a, e_n = _features(), _features(), _features()
    mask = _block_mask()
    expected = 0.0
    for a, b, c in zip(t_n, t_a, e_n):
        m = mask_at_scale(mask, a.shape[-2:])
        expected += (1 - F.cosine_similarity(a, c, dim=1)).mean()
        expected += ((1 - F.cosine_similarity(b, c, dim=1)) - m).abs().mean()
    torch.testing.assert_close(teacher_loss(t_n, t_a, e_n, mask), expected)


def _linear_align_corners(a: np.ndarray, out: int, axis: int) -> np.ndarray:
    """1-D linear resampling with align_corners=True along ``axis``: out[i] = a at i * (n - 1) / (out - 1)."""
    n = a.shape[axis]
    x = np.arange(out) * (n - 1) / (out - 1)
    lo = np.floor(x).astype(int).clip(0, n - 1)
    hi = (lo + 1).clip(0, n - 1)
    w = x - lo
    shape = [1] * a.ndim
    shape[axis] = out
    return np.take(a, lo, axis) * (1 - w).reshape(shape) + np.take(a, hi, axis) * w.reshape(shape)


def test_cascaded_teacher_masks_follow_the_release():
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 1, 32, 32)) > 0.6).astype(np.float32)
    sizes = [(8, 8), (4, 4), (2, 2)]
    expected, current = [], mask[:, 0]
    for h, w in sizes:
        current = (_linear_align_corners(_linear_align_corners(current, h, 1), w, 2) >= 0.5).astype(np.float32)
        expected.append(current)
    cascade = teacher_masks(torch.from_numpy(mask), sizes, "cascade")
    for got, want in zip(cascade, expected):
        np.testing.assert_array_equal(got.numpy(), want)
    direct = teacher_masks(torch.from_numpy(mask), sizes, "direct")
    assert any(not torch.equal(c, d) for c, d in zip(cascade, direct))  # the two rules differ on a ragged mask
    t_n, t_a, e_n = _features(), _features(), _features()
    block = _block_mask()
    expected_loss = 0.0
    for a, b, c, m in zip(t_n, t_a, e_n, teacher_masks(block, SIZES, "cascade")):
        expected_loss += (1 - F.cosine_similarity(a, c, dim=1)).mean() + ((1 - F.cosine_similarity(b, c, dim=1)) - m).abs().mean()
    torch.testing.assert_close(teacher_loss(t_n, t_a, e_n, block, mask_mode="cascade"), expected_loss)
