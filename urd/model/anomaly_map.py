"""Anomaly map of RD/URD: sum over three scales of (1 - cos(F_T, F_S)), upsampled to the input, blurred."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import cosine_distance_map


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """Normalised 1-D Gaussian with radius int(truncate * sigma + 0.5), as scipy.ndimage.gaussian_filter."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of a B x 1 x H x W map as two convolutions.

    Written in torch rather than calling scipy/OpenCV so that it is part of the exported
    TorchScript/ONNX graph. Equal to scipy.ndimage.gaussian_filter(..., truncate=4.0) with
    ``mode=border``: ``mirror`` reflects without repeating the edge pixel, ``reflect`` (the authors'
    release) repeats it.
    """

    def __init__(self, sigma: float, border: str = "mirror") -> None:
        super().__init__()
        if border not in ("mirror", "reflect"):
            raise ValueError(f"blur border must be 'mirror' or 'reflect' (got {border!r})")
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.radius = (kernel.numel() - 1) // 2
        self.border = border
        self.register_buffer("kernel_x", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_y", kernel.view(1, 1, -1, 1), persistent=False)
        # reflect: the first / last r pixels in reverse order, gathered with constant indices (exportable)
        self.register_buffer("reverse", torch.arange(self.radius - 1, -1, -1), persistent=False)

    def _pad(self, x: Tensor, dim: int) -> Tensor:
        r = self.radius
        if self.border == "mirror":
            return F.pad(x, (r, r, 0, 0) if dim == 3 else (0, 0, r, r), mode="reflect")
        head = x.narrow(dim, 0, r).index_select(dim, self.reverse)
        tail = x.narrow(dim, x.shape[dim] - r, r).index_select(dim, self.reverse)
        return torch.cat([head, x, tail], dim=dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.radius == 0:
            return x
        x = F.conv2d(self._pad(x, 3), self.kernel_x)
        return F.conv2d(self._pad(x, 2), self.kernel_y)


class AnomalyMap(nn.Module):
    """[F_T^1..3], [F_S^1..3] -> anomaly map B x 1 x H x W (fp32) at the input resolution."""

    def __init__(self, image_size: int, sigma: float = 4.0, border: str = "mirror") -> None:
        super().__init__()
        if sigma > 0 and int(4.0 * sigma + 0.5) >= image_size:
            raise ValueError(f"blur sigma {sigma} is too large for image size {image_size}")
        self.image_size = image_size
        self.blur = GaussianBlur(sigma, border)

    def scale_maps(self, teacher: list[Tensor], student: list[Tensor]) -> list[Tensor]:
        """Each scale's 1 - cos(F_T, F_S), upsampled to the input: a list of B x 1 x H x W, unblurred."""
        size = (self.image_size, self.image_size)
        return [F.interpolate(cosine_distance_map(t, s).unsqueeze(1), size=size, mode="bilinear", align_corners=True)
                for t, s in zip(teacher, student)]

    def forward(self, teacher: list[Tensor], student: list[Tensor]) -> Tensor:
        # fp32 under bf16 autocast too: the map's values are compared with calibrated thresholds.
        with torch.autocast(teacher[0].device.type, enabled=False):
            maps = self.scale_maps(teacher, student)
            total = maps[0]
            for upsampled in maps[1:]:
                total = total + upsampled
            return self.blur(total)


def image_score(anomaly_map: Tensor) -> Tensor:
    """Image-level anomaly score: the maximum of each map, B x 1 x H x W -> B."""
    return anomaly_map.flatten(1).amax(dim=1)

