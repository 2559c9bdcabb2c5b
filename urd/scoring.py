"""Scoring: manifest rows -> anomaly maps, image scores and ground-truth masks.

The one loop behind evaluation, calibration, model selection during training, the Predictor (model
folders and ONNX bundles) and the int8 parity check. A *scorer* is any function from a batch of
N x 3 x S x S RGB images in [0, 1] to anomaly maps (N x S x S) and image scores (N), raw scale:
:func:`torch_scorer` wraps an eager inference graph, an ``OnnxBundle`` already is one.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .data.torch_data import EvalDataset, eval_loader
from .model.urd import InferenceGraph
from .progress import Progress

Scorer = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


def torch_scorer(graph: InferenceGraph, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Scorer:
    """An eager graph as a scorer: eval mode, channels_last, under ``autocast``; maps in fp32."""
    graph.eval().to(memory_format=torch.channels_last)

    @torch.no_grad()
    def score(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with autocast():
            maps, scores = graph(images.to(device, memory_format=torch.channels_last))
        return maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()

    return score


def score_rows(scorer: Scorer, rows: pd.DataFrame, image_size: int, batch_size: int = 8, progress: bool = False,
               desc: str = "scoring") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anomaly maps (N x S x S float32), image scores (N,) and ground-truth masks (N x S x S bool) of ``rows``."""
    maps, scores, masks = [], [], []
    loader = eval_loader(EvalDataset(rows, image_size), batch_size)
    with Progress(len(loader), desc, unit="batch", enabled=progress) as bar:
        for batch in loader:
            m, s = scorer(batch["image"])
            maps.append(np.asarray(m, np.float32))
            scores.append(np.asarray(s, np.float32))
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
            bar.update(1)
    if not maps:
        s = image_size
        return np.zeros((0, s, s), np.float32), np.zeros(0, np.float32), np.zeros((0, s, s), bool)
    return np.concatenate(maps), np.concatenate(scores), np.concatenate(masks)


def score_images(graph: InferenceGraph, rows: pd.DataFrame, image_size: int, device: torch.device, batch_size: int = 8,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, progress: bool = False,
                 desc: str = "scoring") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`score_rows` with an eager graph (evaluate, calibrate, model selection)."""
    return score_rows(torch_scorer(graph, device, autocast), rows, image_size, batch_size, progress, desc)
