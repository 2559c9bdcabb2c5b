"""Training speed at the demo settings, fp32 and bf16 side by side.

    python -m bench.train_speed [--iterations 6] [--train-to-end [--seeds 0 1]]

Each precision runs in its own process (so peak memory is its own): seconds per iteration of the
whole run (warm-up and the final checkpoint included; bench/train_profile.py gives the steady-state
median), images/s (normal + synthetic pair counted once per sample), peak resident memory, and the
losses after the same iterations. With --train-to-end both train every demo category for the full
budget with the same seed and the test metrics are compared. Writes bench/results/train_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine


def worker(precision: str, iterations: int, train_to_end: bool, seeds: list[int]) -> dict:
    from urd.config import load_params
    from urd.data.manifest import ingest_category
    from urd.evaluate import evaluate_model
    from urd.train import train_category

    params = load_params("params.yaml")
    budget = params.train.iterations if train_to_end else iterations
    train = params.train.model_copy(update={"precision": precision, "iterations": budget, "checkpoint_every": budget, "log_every": 1})
    params = params.model_copy(update={"train": train})
    # the speed figures come from the last category; --train-to-end trains and evaluates every one
    categories = params.dataset.categories if train_to_end else params.dataset.categories[-1:]
    result: dict = {"precision": precision, "iterations": budget, "metrics": {}}
    runs = [(category, seed) for seed in (seeds if train_to_end else [params.seed]) for category in categories]
    with tempfile.TemporaryDirectory() as tmp:
        for category, seed in runs:
            params = params.model_copy(update={"seed": seed})
            manifest = ingest_category(params, category, progress=False)
            start = time.perf_counter()
            summary = train_category(params, category, manifest, Path(tmp) / f"{category}_{seed}", progress=False)
            wall = time.perf_counter() - start
            result |= {"category": category, "seconds_per_iteration": summary["seconds"] / budget,
                       "images_per_s": budget * train.batch_size / summary["seconds"], "wall_seconds": wall,
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "last_losses": summary["history"][-1],
                       "device": summary["device"], "num_workers": summary["num_workers"]}
            if train_to_end:
                metrics = evaluate_model(Path(tmp) / f"{category}_{seed}", manifest, Path(tmp) / f"{category}_{seed}_report",
                                         progress=False)["overall"]
                result["metrics"][f"{category} seed {seed}"] = {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--train-to-end", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="with --train-to-end")
    parser.add_argument("--worker", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.iterations, args.train_to_end, args.seeds)))
        return
    rows = []
    for precision in ("fp32", "bf16"):
        cmd = [sys.executable, "-m", __spec__.name, "--worker", precision, "--iterations", str(args.iterations)] + (["--train-to-end", "--seeds", *map(str, args.seeds)] if args.train_to_end else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    table = Table(title=f"Training at the demo settings on {rows[0]['device']} ({rows[0]['iterations']} iterations)")
    for col in ("precision", "s / iteration", "images / s", "peak RSS (MB)", "teacher loss", "student loss"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["precision"], f"{r['seconds_per_iteration']:.2f}", f"{r['images_per_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['last_losses'].get('teacher', float('nan')):.4f}", f"{r['last_losses']['student']:.4f}")
    Console(width=120).print(table)
    print(f"bf16 / fp32 images/s: {speedup:.2f}x")
    if args.train_to_end:
        table = Table(title=f"Test metrics after the full budget ({rows[0]['iterations']} iterations, same seeds)")
        for col in ("run", "precision", "image AUROC", "pixel AUROC", "AUPRO"):
            table.add_column(col, justify="right")
        for category in rows[0]["metrics"]:
            for r in rows:
                m = r["metrics"][category]
                table.add_row(category, r["precision"], f"{m['image_auroc']:.4f}", f"{m['pixel_auroc']:.4f}", f"{m['pixel_aupro']:.4f}")
        Console(width=120).print(table)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = RESULTS / f"train_speed_{device}.json"
    out.write_text(json.dumps({"machine": machine(), "rows": rows, "bf16_speedup": speedup}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
