import math

import numpy as np
import pytest
import torch

from urd.config import SynthesisParams
from urd.data.synthesis import AnomalySynthesizer, perlin_from_gradients


def _textures(n=5, size=64):
    g = torch.Generator().manual_seed(9)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _images(b=8, size=64):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(4))


def test_masks_are_binary_nonempty_and_outside_pixels_unchanged():
    synth = AnomalySynthesizer(SynthesisParams(), _textures(), seed=0)
    images = _images()
    anomalous, mask = synth(images)
    assert anomalous.shape == images.shape and mask.shape == (8, 1, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.flatten(1).sum(1) > 0).all()
    outside = (1 - mask).bool().expand_as(images)
    assert torch.equal(anomalous[outside], images[outside])
    assert not torch.equal(anomalous, images)


def test_blend_formula_holds_inside_the_mask_for_fixed_beta():
    beta = 0.3
    synth = AnomalySynthesizer(SynthesisParams(beta_range=(beta, beta)), _textures(n=1), seed=1)
    images = _images(4)
    # The same generator state reproduces the texture draw: rebuild it to know I_t.
    reference = AnomalySynthesizer(SynthesisParams(beta_range=(beta, beta)), _textures(n=1), seed=1)
    anomalous, mask = synth(images)
    reference.masks(4, (64, 64))
    texture = reference.texture_batch(4, (64, 64))
    expected = (1 - mask) * images + (1 - beta) * (mask * images) + beta * (mask * texture)
    torch.testing.assert_close(anomalous, expected)
    inside = mask.bool().expand_as(images)
    torch.testing.assert_close(anomalous[inside], ((1 - beta) * images + beta * texture)[inside])


def test_foreground_restriction_is_honoured_even_when_tiny():
    fg = torch.zeros(6, 1, 64, 64, dtype=torch.bool)
    fg[:, :, 20:44, 10:30] = True
    fg[5] = False
    fg[5, :, 30:33, 30:33] = True  # 9 pixels: forces redraws / the fallback
    synth = AnomalySynthesizer(SynthesisParams(), _textures(), seed=2)
    _, mask = synth(_images(6), fg)
    assert (mask.bool() & ~fg).sum() == 0
    assert (mask.flatten(1).sum(1) > 0).all()


def test_same_seed_same_batch_and_different_seed_differs():
    images = _images()
    a = AnomalySynthesizer(SynthesisParams(), _textures(), seed=5)(images)
    b = AnomalySynthesizer(SynthesisParams(), _textures(), seed=5)(images)
    c = AnomalySynthesizer(SynthesisParams(), _textures(), seed=6)(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_every_sample_carries_an_anomaly_and_is_unchanged_outside_it():
    synth = AnomalySynthesizer(SynthesisParams(), _textures(), seed=0)
    images = _images(6)
    anomalous, mask = synth(images)
    assert (mask.flatten(1).sum(1) > 0).all()  # empty masks are drawn again
    outside = mask.expand_as(images) == 0
    assert torch.equal(anomalous[outside], images[outside])


def test_perlin_matches_a_per_pixel_reference():
    size, res = (24, 40), (2, 4)
    g = torch.Generator().manual_seed(0)
    angles = 2 * math.pi * torch.rand(1, 5, 5, generator=g)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    ours = perlin_from_gradients(size, torch.tensor([res[0]]), torch.tensor([res[1]]), grads)[0].numpy()

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    G = grads[0].double().numpy()
    ref = np.zeros(size)
    for y in range(size[0]):
        for x in range(size[1]):
            py, px = (y + 0.5) * res[0] / size[0], (x + 0.5) * res[1] / size[1]
            iy, ix = int(py), int(px)
            fy, fx = py - iy, px - ix
            dots = {}
            for dy in (0, 1):
                for dx in (0, 1):
                    gx_, gy_ = G[iy + dy, ix + dx]
                    dots[dy, dx] = gx_ * (fx - dx) + gy_ * (fy - dy)
            top = dots[0, 0] + fade(fx) * (dots[0, 1] - dots[0, 0])
            bottom = dots[1, 0] + fade(fx) * (dots[1, 1] - dots[1, 0])
            ref[y, x] = math.sqrt(2) * (top + fade(fy) * (bottom - top))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.abs(ours).max() <= 1.0


def test_bad_texture_array_is_refused():
    with pytest.raises(ValueError, match="textures"):
        AnomalySynthesizer(SynthesisParams(), torch.zeros(0, 3, 8, 8))


def test_the_release_switches_leave_empty_masks_and_textures_as_they_are():
    # A small foreground: with redraws every sample gets an anomaly, without (the release) some stay normal.
    foreground = torch.zeros(64, 1, 32, 32)
    foreground[:, :, 12:20, 12:20] = 1
    images = _images(64, 32)
    redrawn = AnomalySynthesizer(SynthesisParams(), _textures(size=32), seed=3)(images, foreground)[1]
    kept = AnomalySynthesizer(SynthesisParams(redraw_empty_masks=False), _textures(size=32), seed=3)(images, foreground)[1]
    assert (redrawn.flatten(1).amax(1) > 0).all()
    empty = kept.flatten(1).amax(1) == 0
    assert 0 < int(empty.sum()) < 64
    # Without flips every drawn texture is one of the bank's images exactly; with them some are turned.
    bank = _textures(n=3, size=32)
    plain = AnomalySynthesizer(SynthesisParams(texture_flips=False), bank, seed=1).texture_batch(32, (32, 32))
    flipped = AnomalySynthesizer(SynthesisParams(), bank, seed=1).texture_batch(32, (32, 32))
    unit = bank.float().mul(1 / 255)
    assert all(any(torch.equal(t, u) for u in unit) for t in plain)
    assert not all(any(torch.equal(t, u) for u in unit) for t in flipped)
