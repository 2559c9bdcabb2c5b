"""Synthetic anomalies (paper supplement, "Details of Anomaly Synthesis"; after DRAEM), batched in torch.

For a batch of normal images I_n in [0, 1] (B x 3 x H x W) on any device:

1. Perlin noise per sample with a random scale 2^kx x 2^ky (k uniform in the configured range),
   rotated by a random angle within +-max_rotation, thresholded at ``threshold`` -> M_syn;
2. M_syn restricted to the sample's foreground mask (objects);
3. I_a = (1 - M) * I_n + (1 - beta) * (M * I_n) + beta * (M * I_t)          (eq. 7)
   with I_t a random texture image and beta ~ U(beta_range) per sample.

Samples whose mask came out empty are drawn again, so every sample carries an anomaly
(``redraw_empty_masks``; the authors' release leaves them normal). Everything runs as tensor ops over
the whole batch on the training device; nothing loops over samples in Python.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import SynthesisParams

MAX_REDRAWS = 8


def _fade(t: Tensor) -> Tensor:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res_y: Tensor, res_x: Tensor, generator: torch.Generator) -> Tensor:
    """Batched 2-D Perlin noise, one lattice resolution per sample: -> B x H x W, values in [-1, 1].

    res_y, res_x: integer tensors (B,) of lattice cells along each axis.
    """
    b = res_y.shape[0]
    max_res = int(max(res_y.max().item(), res_x.max().item()))
    angles = 2 * math.pi * torch.rand(b, max_res + 1, max_res + 1, generator=generator, device=res_y.device)
    return perlin_from_gradients(shape, res_y, res_x, torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1))


def perlin_from_gradients(shape: tuple[int, int], res_y: Tensor, res_x: Tensor, gradients: Tensor) -> Tensor:
    """Perlin noise for given unit lattice gradients (B x R+1 x R+1 x 2, [..., 0] along x) -> B x H x W.

    Pixel (y, x) lies at lattice position ((y + 0.5) * res_y / H, (x + 0.5) * res_x / W).
    """
    device = res_y.device
    h, w = shape
    lattice = torch.arange(gradients.shape[1], device=device)
    ys = (torch.arange(h, device=device).float()[None, :] + 0.5) * res_y[:, None].float() / h  # B x H
    xs = (torch.arange(w, device=device).float()[None, :] + 0.5) * res_x[:, None].float() / w  # B x W
    y0, x0 = ys.floor().long(), xs.floor().long()
    fy, fx = ys - y0, xs - x0  # position inside the cell
    ty, tx = _fade(fy), _fade(fx)

    # noise(y, x) = sum over the 4 cell corners (y0+dy, x0+dx) of
    #   wy_dy(y) * wx_dx(x) * (g_x[corner] * (fx - dx) + g_y[corner] * (fy - dy)),
    # with wy_0 = 1 - ty, wy_1 = ty (the fade interpolation; likewise for x). Each term separates
    # into (rows x lattice) @ gradients @ (lattice x cols) with two non-zeros per row/column, so
    # the whole field is two batched matmuls: no per-pixel gather, no per-sample Python loop.
    at0 = (y0[:, :, None] == lattice).float()  # B x H x R+1
    at1 = ((y0 + 1)[:, :, None] == lattice).float()
    rows_x = at0 * (1 - ty)[:, :, None] + at1 * ty[:, :, None]
    rows_y = at0 * ((1 - ty) * fy)[:, :, None] + at1 * (ty * (fy - 1))[:, :, None]
    at0 = (x0[:, None, :] == lattice[:, None]).float()  # B x R+1 x W
    at1 = ((x0 + 1)[:, None, :] == lattice[:, None]).float()
    cols_x = at0 * ((1 - tx) * fx)[:, None, :] + at1 * (tx * (fx - 1))[:, None, :]
    cols_y = at0 * (1 - tx)[:, None, :] + at1 * tx[:, None, :]
    noise = rows_x @ (gradients[..., 0] @ cols_x) + rows_y @ (gradients[..., 1] @ cols_y)
    return math.sqrt(2) * noise


def rotate(maps: Tensor, degrees: Tensor) -> Tensor:
    """Rotate B x 1 x H x W maps about their centre by per-sample angles; uncovered corners become 0."""
    b, _, h, w = maps.shape
    theta = degrees.to(maps.dtype) * (math.pi / 180)
    cos, sin = torch.cos(theta).view(b, 1, 1), torch.sin(theta).view(b, 1, 1)
    # The sampling grid of F.affine_grid for a pure rotation, written out by broadcasting: the
    # generic version runs a B x HW x 3 @ 3 x 2 matmul and is 3-4x slower here.
    xs = ((torch.arange(w, device=maps.device, dtype=maps.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, device=maps.device, dtype=maps.dtype) * 2 + 1) / h - 1).view(1, h, 1)
    grid = torch.stack([cos * xs - sin * ys, sin * xs + cos * ys], dim=-1)  # B x H x W x 2
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class AnomalySynthesizer:
    """Callable (images, foreground) -> (anomalous images, masks), deterministic given its seed.

    textures: N x 3 x H x W uint8 tensor (the texture source cache at the training size; kept as
    uint8 on the device, 1/4 of the memory of floats) or float in [0, 1].
    """

    def __init__(self, params: SynthesisParams, textures: Tensor, seed: int = 0, device: str | torch.device = "cpu") -> None:
        if textures.ndim != 4 or textures.shape[1] != 3 or textures.shape[0] == 0:
            raise ValueError(f"textures must be a non-empty N x 3 x H x W tensor, got shape {tuple(textures.shape)}")
        self.params = params
        self.device = torch.device(device)
        self.textures = textures.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def _uniform(self, n: int, lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.generator, device=self.device)

    def masks(self, n: int, shape: tuple[int, int], foreground: Tensor | None = None) -> Tensor:
        """n binary masks, n x 1 x H x W, restricted to ``foreground`` (n x 1 x H x W, or None)."""
        p = self.params
        lo, hi = p.perlin_scale_exponents
        masks = torch.zeros(n, 1, *shape, device=self.device)
        todo = torch.arange(n, device=self.device)
        attempts = MAX_REDRAWS + 1 if p.redraw_empty_masks else 1
        for attempt in range(attempts):
            k = len(todo)
            res_y = 2 ** torch.randint(lo, hi, (k,), generator=self.generator, device=self.device)
            res_x = 2 ** torch.randint(lo, hi, (k,), generator=self.generator, device=self.device)
            noise = perlin_noise(shape, res_y, res_x, self.generator).unsqueeze(1)
            noise = rotate(noise, self._uniform(k, -p.max_rotation, p.max_rotation))
            fg = None if foreground is None else foreground[todo].to(self.device, noise.dtype)
            if fg is not None:
                noise = noise * fg
            threshold = torch.full((k, 1, 1, 1), p.threshold, device=self.device)
            if p.redraw_empty_masks and attempt == MAX_REDRAWS:
                # Last resort (e.g. a tiny foreground): lower the threshold to keep the strongest noise.
                peak = noise.flatten(1).amax(1).view(k, 1, 1, 1)
                threshold = torch.minimum(threshold, 0.9 * peak)
            m = (noise > threshold).float()
            masks[todo] = m
            empty = m.flatten(1).amax(1) == 0
            todo = todo[empty]
            if len(todo) == 0:
                break
        return masks

    def __call__(self, images: Tensor, foreground: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """images: B x 3 x H x W in [0, 1] -> (I_a: B x 3 x H x W, M: B x 1 x H x W in {0, 1})."""
        p = self.params
        images = images.to(self.device)
        b, _, h, w = images.shape
        mask = self.masks(b, (h, w), foreground)
        texture = self.texture_batch(b, (h, w)).to(images.dtype)
        beta = self._uniform(b, *p.beta_range).view(b, 1, 1, 1).to(images.dtype)
        # eq. (7) rearranged: I_a = I_n + beta * M * (I_t - I_n); where M = 0 this is exactly I_n.
        anomalous = torch.lerp(images, texture, beta * mask.to(images.dtype))
        return anomalous, mask

    def texture_batch(self, n: int, shape: tuple[int, int]) -> Tensor:
        """n random textures (with ``texture_flips``: random flips and transposes), resized to ``shape`` if needed."""
        idx = torch.randint(0, self.textures.shape[0], (n,), generator=self.generator, device=self.device)
        tex = self.textures[idx]
        if self.params.texture_flips:
            flip = torch.rand(n, generator=self.generator, device=self.device) < 0.5
            tex[flip] = tex[flip].flip(-1)
            if tex.shape[-1] == tex.shape[-2]:
                turn = torch.rand(n, generator=self.generator, device=self.device) < 0.5
                tex[turn] = tex[turn].transpose(-1, -2)
        tex = tex.float()
        if self.textures.dtype == torch.uint8:
            tex.mul_(1 / 255)
        if tex.shape[-2:] != torch.Size(shape):
            tex = F.interpolate(tex, size=shape, mode="bilinear", align_corners=False)
        return tex
