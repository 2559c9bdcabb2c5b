"""Prepare stage: per-category foreground masks and the texture source cache, as compact arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import Params
from .foreground import foreground_mask, method_for, validate_method
from .images import read_image, resize_image
from .textures import texture_cache


def compute_foreground(paths: list[str], size: int, method: str, progress: bool = True) -> np.ndarray:
    """N x S x S bool foreground masks of the images at the training resolution."""
    validate_method(method)
    out = np.ones((len(paths), size, size), bool)
    if method == "none":
        return out
    for i, path in enumerate(tqdm(paths, desc=f"foreground ({method})", unit="img", disable=not progress)):
        out[i] = foreground_mask(resize_image(read_image(path), size), method)
    return out


def save_foreground(path: str | Path, paths: list[str], masks: np.ndarray, method: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, paths=np.array(paths), masks=np.packbits(masks, axis=-1), shape=np.array(masks.shape), method=np.array(method))
    tmp.replace(path)


def load_foreground(path: str | Path, paths: list[str]) -> np.ndarray:
    """Masks for ``paths`` in that order; refuses a cache computed for other images."""
    with np.load(path, allow_pickle=False) as data:
        cached = [str(p) for p in data["paths"]]
        shape = tuple(int(v) for v in data["shape"])
        masks = np.unpackbits(data["masks"], axis=-1, count=shape[-1]).astype(bool)
    index = {p: i for i, p in enumerate(cached)}
    missing = [p for p in paths if p not in index]
    if missing:
        raise ValueError(f"{path} has no foreground mask for {missing[0]} ({len(missing)} images); rerun the prepare stage")
    return masks[[index[p] for p in paths]]


def prepare_category(manifest: pd.DataFrame, params: Params, category: str, out_dir: str | Path, progress: bool = True) -> dict:
    """Write ``foreground.npz`` (training images) under ``out_dir``; returns a small summary."""
    p = params.for_category(category)
    method = method_for(category, p.synthesis.foreground, p.dataset.name)
    paths = manifest.loc[manifest["split"] == "train", "path"].tolist()
    masks = compute_foreground(paths, p.dataset.image_size, method, progress)
    save_foreground(Path(out_dir) / "foreground.npz", paths, masks, method)
    summary = {"category": category, "method": method, "images": len(paths), "mean_coverage": float(masks.mean()) if len(masks) else 0.0}
    (Path(out_dir) / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def prepare_textures(params: Params, out_path: str | Path, progress: bool = True) -> str:
    """Write the texture cache (N x S x S x 3 uint8 .npy) and, beside it (same name, .json), its
    source ("dtd:<root>" or "procedural"); returns the source."""
    textures, source = texture_cache(params.dataset.image_size, params.synthesis.dtd_root or None, seed=params.seed, progress=progress)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.npy")
    np.save(tmp, textures)
    tmp.replace(out_path)
    out_path.with_suffix(".json").write_text(json.dumps({"source": source, "count": len(textures)}) + "\n")
    return source


def load_textures(path: str | Path) -> tuple[np.ndarray, str]:
    """The texture cache written by :func:`prepare_textures` and its source."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    source = json.loads(sidecar.read_text())["source"] if sidecar.is_file() else "unknown"
    return np.load(path), source
