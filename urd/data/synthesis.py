"""Synthetic anomalies (paper supplement, "Details of Anomaly Synthesis"; after DRAEM), batched in torch.

For a batch of normal images I_n in [0, 1] (B x 3 x H x W) on any device:

1. Perlin noise per sample with a random scale 2^kx x 2^ky (k uniform in the configured range),
   rotated by a random angle within +-max_rotation, thresholded at ``threshold`` -> M_syn;
2. M_syn restricted to the sample's foreground mask (objects);
3. I_a = (1 - M) * I_n + (1 - beta) * (M * I_n) + beta * (M * I_t)          (eq. 7)
   with I_t a random texture image and beta ~ U(beta_range) per sample.

Samples whose mask came out empty are drawn again, so every sample carries an anomaly unless
``empty_mask_probability`` asks for some anomaly-free pairs. Everything runs as tensor ops over
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
    max_res = gradients.shape[1] - 1

    ys = (torch.arange(h, device=device).float()[None, :] + 0.5) * res_y[:, None].float() / h  # B x H
    xs = (torch.arange(w, device=device).float()[None, :] + 0.5) * res_x[:, None].float() / w  # B x W
    y0, x0 = ys.floor().long(), xs.floor().long()
    fy, fx = ys - y0, xs - x0  # position inside the cell

    # Corner gradients g[b, y0 + dy, x0 + dx] for every pixel, as one-hot selection matrices
    # (rows x lattice) @ gradients @ (lattice x cols): batched matmuls instead of a per-pixel gather,
    # several times faster on CPU and GPU.
    lattice = torch.arange(max_res + 1, device=device)
    rows = [((y0 + d)[:, :, None] == lattice).float() for d in (0, 1)]  # B x H x R+1
    cols = [((x0 + d)[:, :, None] == lattice).float().transpose(1, 2) for d in (0, 1)]  # B x R+1 x W
    gx, gy = gradients[..., 0], gradients[..., 1]

    def corner(dy: int, dx: int) -> Tensor:
        g_x = rows[dy] @ gx @ cols[dx]  # B x H x W
        g_y = rows[dy] @ gy @ cols[dx]
        return g_x * (fx[:, None, :] - dx) + g_y * (fy[:, :, None] - dy)

    ty, tx = _fade(fy)[:, :, None], _fade(fx)[:, None, :]
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2) * torch.lerp(top, bottom, ty)


def rotate(maps: Tensor, degrees: Tensor) -> Tensor:
    """Rotate B x 1 x H x W maps about their centre by per-sample angles; uncovered corners become 0."""
    theta = degrees * math.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(affine, list(maps.shape), align_corners=False)
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
        for attempt in range(MAX_REDRAWS + 1):
            k = len(todo)
            res_y = 2 ** torch.randint(lo, hi, (k,), generator=self.generator, device=self.device)
            res_x = 2 ** torch.randint(lo, hi, (k,), generator=self.generator, device=self.device)
            noise = perlin_noise(shape, res_y, res_x, self.generator).unsqueeze(1)
            noise = rotate(noise, self._uniform(k, -p.max_rotation, p.max_rotation))
            fg = None if foreground is None else foreground[todo].to(self.device, noise.dtype)
            if fg is not None:
                noise = noise * fg
            threshold = torch.full((k, 1, 1, 1), p.threshold, device=self.device)
            if attempt == MAX_REDRAWS:
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
        if p.empty_mask_probability > 0:
            keep = torch.rand(b, generator=self.generator, device=self.device) >= p.empty_mask_probability
            mask = mask * keep.view(b, 1, 1, 1).to(mask.dtype)
        texture = self.texture_batch(b, (h, w)).to(images.dtype)
        beta = self._uniform(b, *p.beta_range).view(b, 1, 1, 1).to(images.dtype)
        anomalous = (1 - mask) * images + (1 - beta) * (mask * images) + beta * (mask * texture)
        return anomalous, mask

    def texture_batch(self, n: int, shape: tuple[int, int]) -> Tensor:
        """n random textures with random flips and 90-degree turns, resized to ``shape`` if needed."""
        idx = torch.randint(0, self.textures.shape[0], (n,), generator=self.generator, device=self.device)
        tex = self.textures[idx].float()
        if self.textures.dtype == torch.uint8:
            tex = tex / 255.0
        if tex.shape[-2:] != torch.Size(shape):
            tex = F.interpolate(tex, size=shape, mode="bilinear", align_corners=False)
        flip = torch.rand(n, generator=self.generator, device=self.device) < 0.5
        tex = torch.where(flip.view(n, 1, 1, 1), tex.flip(-1), tex)
        if shape[0] == shape[1]:
            turn = torch.rand(n, generator=self.generator, device=self.device) < 0.5
            tex = torch.where(turn.view(n, 1, 1, 1), tex.transpose(-1, -2), tex)
        return tex
