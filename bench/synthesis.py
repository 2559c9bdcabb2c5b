"""Anomaly synthesis throughput: batched torch (urd.data.synthesis) vs a per-sample NumPy version.

    python bench/synthesis.py [--size 256] [--batch 16] [--repeats 10] [--device cpu]

The NumPy version follows the same recipe one image at a time, the way DRAEM-style code does it
(Perlin noise by per-pixel gather, OpenCV rotation, threshold, foreground, redraw when empty,
random texture with flips, eq. 7 blend). Prints a table, writes bench/results/synthesis_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

from urd.config import SynthesisParams  # noqa: E402
from urd.data.synthesis import AnomalySynthesizer  # noqa: E402


def numpy_perlin(rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int]) -> np.ndarray:
    h, w = shape
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)
    ys = (np.arange(h) + 0.5) * res[0] / h
    xs = (np.arange(w) + 0.5) * res[1] / w
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[Y0 + dy, X0 + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    top = dot(0, 0) + fade(fx) * (dot(0, 1) - dot(0, 0))
    bottom = dot(1, 0) + fade(fx) * (dot(1, 1) - dot(1, 0))
    return math.sqrt(2) * (top + fade(fy) * (bottom - top))


def numpy_synthesis(rng, images: np.ndarray, foreground: np.ndarray, textures: np.ndarray, p: SynthesisParams):
    """images: B x H x W x 3 float32 [0, 1]; textures: N x H x W x 3 uint8."""
    out, masks = np.empty_like(images), np.empty(images.shape[:3], np.float32)
    h, w = images.shape[1:3]
    for i in range(len(images)):
        while True:
            res = tuple(2 ** rng.integers(*p.perlin_scale_exponents, size=2))
            noise = numpy_perlin(rng, (h, w), res).astype(np.float32)
            rot = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-p.max_rotation, p.max_rotation), 1.0)
            noise = cv2.warpAffine(noise, rot, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
            mask = ((noise > p.threshold) & foreground[i]).astype(np.float32)
            if mask.any():
                break
        tex = textures[rng.integers(len(textures))]
        if rng.random() < 0.5:
            tex = tex[:, ::-1]
        if rng.random() < 0.5:
            tex = tex.transpose(1, 0, 2)
        tex = tex.astype(np.float32) / 255
        beta = rng.uniform(*p.beta_range)
        m = mask[..., None]
        out[i] = (1 - m) * images[i] + (1 - beta) * (m * images[i]) + beta * (m * tex)
        masks[i] = mask
    return out, masks


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    params = SynthesisParams()
    rng = np.random.default_rng(0)
    s, b = args.size, args.batch
    textures = rng.integers(0, 256, (64, s, s, 3), dtype=np.uint8)
    images = rng.random((b, s, s, 3), dtype=np.float32)
    foreground = np.ones((b, s, s), bool)
    foreground[:, : s // 8] = False

    synth = AnomalySynthesizer(params, torch.from_numpy(textures).permute(0, 3, 1, 2).contiguous(), seed=0, device=args.device)
    timgs = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(args.device)
    tfg = torch.from_numpy(foreground)[:, None].to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t_torch = median_time(lambda: synth(timgs, tfg), args.repeats, sync)
    t_numpy = median_time(lambda: numpy_synthesis(rng, images, foreground, textures, params), max(3, args.repeats // 3))

    rows = [
        {"implementation": f"urd batched torch ({args.device})", "seconds_per_batch": t_torch, "images_per_s": b / t_torch},
        {"implementation": "per-sample NumPy + OpenCV (cpu)", "seconds_per_batch": t_numpy, "images_per_s": b / t_numpy},
    ]
    speedup = t_numpy / t_torch
    table = Table(title=f"Anomaly synthesis, batch {b} at {s}x{s}")
    for col in ("implementation", "ms / batch", "images / s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["implementation"], f"{1000 * r['seconds_per_batch']:.1f}", f"{r['images_per_s']:.0f}")
    Console(width=120).print(table)
    print(f"speed-up: {speedup:.1f}x")
    out = Path(__file__).resolve().parent / "results" / f"synthesis_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps({"machine": machine(), "size": s, "batch": b, "rows": rows, "speedup": speedup}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
