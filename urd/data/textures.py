"""Texture source for anomaly synthesis: DTD when present, else a procedural set that works offline.

The cache is one uint8 array N x S x S x 3 at the training resolution, built once by the prepare
stage. DTD layout: ``<root>/images/<class>/*.jpg``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .images import read_image, resize_image

FAMILIES = ("fractal", "stripes", "cells", "blotches")


def _fractal(rng: np.random.Generator, size: int) -> np.ndarray:
    out = np.zeros((size, size, 3), np.float32)
    for octave in range(5):
        cells = 2 ** (octave + 1)
        noise = rng.random((cells, cells, 3)).astype(np.float32)
        out += cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC) / 2**octave
    return out


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(3, 20)
    wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6))
    colours = rng.random((2, 3)).astype(np.float32)
    t = (wave[..., None] + 1) / 2
    return t * colours[0] + (1 - t) * colours[1]


def _cells(rng: np.random.Generator, size: int) -> np.ndarray:
    n = int(rng.integers(8, 40))
    seeds = rng.random((n, 2)) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    owner = dist.argmin(-1)
    colours = rng.random((n, 3)).astype(np.float32)
    edge = np.sqrt(np.sort(dist, -1)[..., 1]) - np.sqrt(dist.min(-1))
    return colours[owner] * np.clip(edge / 3, 0.2, 1)[..., None]


def _blotches(rng: np.random.Generator, size: int) -> np.ndarray:
    out = np.full((size, size, 3), rng.random(3), np.float32)
    for _ in range(int(rng.integers(10, 40))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(2, max(3, size // 6), 2))
        cv2.ellipse(out, centre, axes, float(rng.uniform(0, 180)), 0, 360, rng.random(3).tolist(), -1)
    return cv2.GaussianBlur(out, (0, 0), 1.5)


def procedural_textures(size: int, count: int = 64, seed: int = 0) -> np.ndarray:
    """``count`` textures cycling through the families -> N x S x S x 3 uint8."""
    makers = {"fractal": _fractal, "stripes": _stripes, "cells": _cells, "blotches": _blotches}
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        tex = makers[FAMILIES[i % len(FAMILIES)]](rng, size)
        tex = (tex - tex.min()) / (np.ptp(tex) + 1e-6)
        out[i] = np.round(255 * tex).astype(np.uint8)
    return out


def dtd_images(root: str | Path) -> list[Path]:
    images = Path(root) / "images"
    if not images.is_dir():
        return []
    return sorted(p for p in images.glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def texture_cache(size: int, dtd_root: str | Path | None = None, count: int = 64, seed: int = 0, progress: bool = True) -> tuple[np.ndarray, str]:
    """Texture array N x S x S x 3 uint8 and its source ("dtd:<root>" or "procedural")."""
    files = dtd_images(dtd_root) if dtd_root else []
    if not files:
        return procedural_textures(size, count, seed), "procedural"
    out = np.empty((len(files), size, size, 3), np.uint8)
    for i, path in enumerate(tqdm(files, desc="textures", unit="img", disable=not progress)):
        out[i] = resize_image(read_image(path), size)
    return out, f"dtd:{dtd_root}"
