"""Input pipeline vs training: can the loader keep up with the training step at the demo settings?

    python bench/loader.py [--workers 2] [--steps 10]

Generates the demo dataset into a temporary folder, then measures (a) training items/s delivered
by the DataLoader (decode + resize + foreground, `workers` processes) and (b) items/s one
training step consumes (synthesis + normalisation + E-T-S step, params.yaml defaults). Prints a
table and writes bench/results/loader_cpu.json; the ratio must be at least 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

from urd.config import Params  # noqa: E402
from urd.data.demo import generate_demo  # noqa: E402
from urd.data.manifest import build_manifest  # noqa: E402
from urd.data.synthesis import AnomalySynthesizer  # noqa: E402
from urd.data.textures import procedural_textures  # noqa: E402
from urd.data.torch_data import TrainDataset, train_batches, to_unit  # noqa: E402
from urd.checkpoint import build_model  # noqa: E402
from urd.train import make_optimizers, train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    params = Params()
    size, batch = params.dataset.image_size, params.train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo(Path(tmp) / "demo")
        manifest = build_manifest("demo", Path(tmp) / "demo", "widget", params.dataset.val_fraction, progress=False)
        paths = manifest.loc[manifest.split == "train", "path"].tolist()
        dataset = TrainDataset(paths, size)
        batches = train_batches(dataset, batch, num_workers=args.workers, seed=0)
        next(batches)  # start the workers
        n = 40
        start = time.perf_counter()
        for _ in range(n):
            next(batches)
        loader_rate = n * batch / (time.perf_counter() - start)

        torch.manual_seed(0)
        model = build_model(params)
        optimizers = make_optimizers(model, params.train)
        textures = torch.from_numpy(procedural_textures(size, 64)).permute(0, 3, 1, 2).contiguous()
        synth = AnomalySynthesizer(params.synthesis, textures)
        item = next(batches)

        def step() -> None:
            images = item["image"].float() / 255
            anomalous, mask = synth(images, item["foreground"])
            train_step(model, optimizers, to_unit(images), to_unit(anomalous), mask)

        step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_rate = args.steps * batch / (time.perf_counter() - start)

    ratio = loader_rate / step_rate
    table = Table(title=f"Training input pipeline at the demo settings ({size}x{size}, batch {batch})")
    table.add_column("what")
    table.add_column("items / s", justify="right")
    table.add_row(f"DataLoader, {args.workers} workers", f"{loader_rate:.0f}")
    table.add_row("training step consumes", f"{step_rate:.1f}")
    table.add_row("ratio (must be >= 3)", f"{ratio:.1f}x")
    Console(width=120).print(table)
    out = Path(__file__).resolve().parent / "results" / "loader_cpu.json"
    out.write_text(json.dumps({"machine": machine(), "image_size": size, "batch": batch, "workers": args.workers,
                               "loader_items_per_s": loader_rate, "train_items_per_s": step_rate, "ratio": ratio}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
