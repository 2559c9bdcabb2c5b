"""Latency per image of the demo's model (params.yaml's backbone and head) on CPU, per format and
precision: eager PyTorch fp32 and bf16 autocast (channels_last, as urd.inference.Predictor runs a
model folder), and the bundle's graphs in ONNX Runtime, fp32 (model.onnx) and int8
(model.int8.onnx, package.quantize: int8); batch 1 and 8.

    python -m bench.bundle_latency [--repeats 20] [--sizes 96 256]

Weights are the backbone's own and an untrained student (speed does not depend on the values);
the int8 graph is calibrated on random images for the same reason (its accuracy is measured on
trained models by bench/int8_bundle.py). bf16 is timed only where the CPU computes it natively
(elsewhere it is emulated and many times slower). Writes bench/results/bundle_latency_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine
from bench.timing import timings

from urd.checkpoint import build_model, load_model, model_meta, save_model
from urd.config import load_params
from urd.export import export_bundle, quantize_bundle
from urd.inference import OnnxBundle
from urd.runtime import native_bf16


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(timings(fn, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="*", default=[96, 256])
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_params("params.yaml")
    bf16 = native_bf16(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            params = base.model_copy(update={"dataset": base.dataset.model_copy(update={"image_size": size})})
            model_dir, bundle_dir = Path(tmp) / f"model{size}", Path(tmp) / f"bundle{size}"
            save_model(build_model(params), model_meta(params, "bench"), model_dir)
            export_bundle(model_dir, bundle_dir, formats=["onnx"])
            quantize_bundle(bundle_dir, np.random.default_rng(0).random((16, 3, size, size), dtype=np.float32))
            graph, _ = load_model(model_dir)
            graph = graph.to(memory_format=torch.channels_last)
            runners = {"onnx fp32": OnnxBundle(bundle_dir), "onnx int8": OnnxBundle(bundle_dir, precision="int8")}
            for batch in (1, 8):
                x = torch.rand(batch, 3, size, size)
                xc = x.contiguous(memory_format=torch.channels_last)
                timings = {}
                with torch.inference_mode():
                    timings["eager fp32"] = median_seconds(lambda: graph(xc), args.repeats)
                    if bf16:
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            timings["eager bf16"] = median_seconds(lambda: graph(xc), args.repeats)
                for name, runner in runners.items():
                    timings[name] = median_seconds(lambda: runner(x.numpy()), args.repeats)
                for name, seconds in timings.items():
                    fmt, precision = name.split()
                    rows.append({"backbone": params.model.backbone, "image_size": size, "batch": batch, "format": fmt, "precision": precision,
                                 "ms_per_image": 1000 * seconds / batch, "images_per_s": batch / seconds,
                                 "vs_eager_fp32": timings["eager fp32"] / seconds})
    m = machine()
    table = Table(title=f"Inference latency on CPU ({params.model.backbone}, median of {args.repeats}, {torch.get_num_threads()} threads, "
                        f"flags: {m['cpu_flags']})")
    for col in ("input", "batch", "format", "precision", "ms / image", "images / s", "vs eager fp32"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['image_size']}²", str(r["batch"]), r["format"], r["precision"], f"{r['ms_per_image']:.1f}", f"{r['images_per_s']:.0f}",
                      f"{r['vs_eager_fp32']:.2f}x")
    Console(width=120).print(table)
    plain = Console(file=io.StringIO(), width=120, color_system=None)
    plain.print(table)
    out = RESULTS / "bundle_latency_cpu"
    out.with_suffix(".json").write_text(json.dumps({"machine": m, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# Inference latency ({m['cpu']}, {m['cores']} cores, flags: {m['cpu_flags']}, torch {m['torch']}, "
                                      f"onnxruntime {m.get('onnxruntime')}, commit {m['git_commit']})\n\n```\n"
                                      + plain.file.getvalue().rstrip() + "\n```\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
