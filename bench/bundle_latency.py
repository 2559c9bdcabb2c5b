"""Latency per image of a packaged model on CPU: ONNX Runtime (the bundle's model.onnx) vs eager
PyTorch (the same weights), batch 1 and 8.

    python bench/bundle_latency.py [--repeats 20] [--sizes 96 256]

Exports a resnet18 bundle (random weights; speed does not depend on their values) per input size
into a temporary folder, times the preprocessed forward pass (images -> anomaly map + score) and
writes bench/results/bundle_latency_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

from urd.checkpoint import load_model, model_meta, save_model  # noqa: E402
from urd.config import parse_params  # noqa: E402
from urd.export import OnnxBundle, export_bundle  # noqa: E402
from urd.model import URD  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="*", default=[96, 256])
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            params = parse_params({"dataset": {"image_size": size}})
            save_model(URD.from_params(params), model_meta(params, "bench"), Path(tmp) / f"model{size}")
            bundle_dir = export_bundle(Path(tmp) / f"model{size}", Path(tmp) / f"bundle{size}", formats=["onnx"])
            graph, _ = load_model(Path(tmp) / f"model{size}")
            onnx = OnnxBundle(bundle_dir)
            for batch in (1, 8):
                x = torch.randn(batch, 3, size, size)
                xn = x.numpy()
                with torch.inference_mode():
                    eager = median_seconds(lambda: graph(x), args.repeats)
                runtime = median_seconds(lambda: onnx(xn), args.repeats)
                with torch.inference_mode():
                    ref = graph(x)[1].numpy()
                rows.append({
                    "backbone": "resnet18", "image_size": size, "batch": batch,
                    "eager_ms_per_image": 1000 * eager / batch, "onnxruntime_ms_per_image": 1000 * runtime / batch,
                    "speedup": eager / runtime, "max_score_difference": float(np.abs(onnx(xn)[1] - ref).max()),
                })
    table = Table(title=f"Bundle latency on CPU (median of {args.repeats}, {torch.get_num_threads()} threads)")
    for col in ("backbone", "input", "batch", "eager ms/img", "ONNX Runtime ms/img", "speed-up", "max |Δscore|"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["backbone"], f"{r['image_size']}²", str(r["batch"]), f"{r['eager_ms_per_image']:.1f}",
                      f"{r['onnxruntime_ms_per_image']:.1f}", f"{r['speedup']:.2f}x", f"{r['max_score_difference']:.1e}")
    Console().print(table)
    out = Path(__file__).resolve().parent / "results" / "bundle_latency_cpu.json"
    out.write_text(json.dumps({"machine": machine(), "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
