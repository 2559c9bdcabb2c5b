"""torch datasets and loaders.

Training items are normal images as uint8 tensors (3 x S x S) with their foreground mask; the
synthetic anomalous pair is made per batch on the training device by
:class:`urd.data.synthesis.AnomalySynthesizer`, then both are normalised with :func:`normalize`.
Evaluation items are normalised images with their ground-truth mask (resized, binarised at 0.5),
label, defect type and path.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .images import read_image, read_mask, resize_image, resize_mask


def to_unit(images: Tensor) -> Tensor:
    """uint8 images -> float in [0, 1] (float input is returned as is): what every model takes; the
    backbone's own normalisation is the first step of the model (urd.model.backbone.Normalize)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def image_tensor(path: str, size: int) -> Tensor:
    """File -> 3 x S x S uint8 tensor (RGB, resized)."""
    return torch.from_numpy(np.ascontiguousarray(resize_image(read_image(path), size).transpose(2, 0, 1)))


# Decoded training images are kept in memory when all of them fit in this many bytes (3 x S x S
# uint8 each: 400 MVTec images at 256 px are 79 MB). Training visits every image many times, and
# decoding + resizing was 11% of a bf16 iteration at the demo settings (bench/results/train_profile_cpu.md).
CACHE_LIMIT_BYTES = 1 << 30


class TrainDataset(Dataset):
    """Normal training images -> {"image": 3xSxS uint8, "foreground": 1xSxS bool, "index": int}
    (``index``: the image's position in ``paths``, which keys per-image caches such as
    :class:`urd.train.FrozenFeatureCache`)."""

    def __init__(self, paths: Sequence[str], image_size: int, foreground: np.ndarray | None = None) -> None:
        if foreground is not None and len(foreground) != len(paths):
            raise ValueError(f"{len(foreground)} foreground masks for {len(paths)} images; rerun the prepare stage")
        self.paths = list(paths)
        self.image_size = image_size
        self.foreground = foreground
        self.cache: dict[int, Tensor] | None = {} if len(self.paths) * 3 * image_size**2 <= CACHE_LIMIT_BYTES else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if self.cache is None:
            image = image_tensor(self.paths[index], self.image_size)
        else:
            if index not in self.cache:
                self.cache[index] = image_tensor(self.paths[index], self.image_size)
            image = self.cache[index].clone()  # a copy: whoever receives it may modify it
        if self.foreground is None:
            fg = torch.ones(1, self.image_size, self.image_size, dtype=torch.bool)
        else:
            fg = torch.from_numpy(np.ascontiguousarray(self.foreground[index], dtype=bool))[None]
        return {"image": image, "foreground": fg, "index": index}


class EvalDataset(Dataset):
    """Manifest rows -> {"image": 3xSxS float in [0, 1], "mask": 1xSxS float {0,1}, "label", "defect_type", "path"}."""

    def __init__(self, rows: pd.DataFrame, image_size: int) -> None:
        self.rows = rows.reset_index(drop=True)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows.iloc[index]
        image = to_unit(image_tensor(row["path"], self.image_size))
        if row["mask_path"]:
            mask = resize_mask(read_mask(row["mask_path"]), self.image_size)
        else:
            mask = np.zeros((self.image_size, self.image_size), bool)
        return {
            "image": image,
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "label": int(row["label"]),
            "defect_type": str(row["defect_type"]),
            "path": str(row["path"]),
        }


class EpochBatchSampler(Sampler[list[int]]):
    """Endless shuffled batches (an iteration budget, not epochs), resumable at any batch.

    Batch ``k`` is a function of (seed, k) alone: epoch ``k // per_epoch`` is a permutation drawn
    from a generator seeded with (seed, epoch), so a resumed run sees exactly the batches an
    uninterrupted one would have. The incomplete last batch of an epoch is dropped, or with
    ``keep_incomplete`` (the authors' release) kept.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_batch: int = 0, keep_incomplete: bool = False) -> None:
        if num_items == 0:
            raise ValueError("no training images: the train split is empty (check the manifest and dataset.val_fraction)")
        self.num_items = num_items
        self.batch_size = min(batch_size, num_items)
        self.per_epoch = -(-num_items // self.batch_size) if keep_incomplete else num_items // self.batch_size
        self.seed = seed
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start_batch
        while True:
            epoch, offset = divmod(k, self.per_epoch)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            permutation = torch.randperm(self.num_items, generator=generator)
            yield permutation[offset * self.batch_size : (offset + 1) * self.batch_size].tolist()
            k += 1


def train_batches(
    dataset: TrainDataset, batch_size: int, num_workers: int = 2, seed: int = 0, start_batch: int = 0, pin_memory: bool = False,
    keep_incomplete: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Endless training batches from ``start_batch`` on (see :class:`EpochBatchSampler`)."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, start_batch, keep_incomplete)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)
    return iter(loader)


def eval_loader(dataset: EvalDataset, batch_size: int = 8, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
