"""int8 bundles (package.quantize: int8) against fp32: parity on each category's test split and latency.

    python -m bench.int8_bundle --run-dir DIR [--repeats 20]

DIR is a repository copy in which `dvc repro` (or `make demo`) ran. For each category the packaged
bundle is copied, quantised as the package stage does (ONNX Runtime static QDQ of the network's
convolutions, calibrated on the val normals) and compared with the fp32 graph on the test split
(image-score Spearman, image and pixel AUROC; the issue's bar: Spearman >= 0.999 and both AUROCs
within 0.005). Latency per batch: fp32 ONNX Runtime, int8 ONNX Runtime and eager PyTorch, batch 1
and 8, at the bundle's input size. Writes bench/results/int8_bundle_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import RESULTS, machine
from bench.timing import timings

from urd.export import add_int8_graph
from urd.checkpoint import load_model
from urd.config import load_params
from urd.data.manifest import read_manifest
from urd.files import METADATA_FILE
from urd.inference import OnnxBundle


def median_ms(fn, repeats: int) -> float:
    return 1000 * statistics.median(timings(fn, repeats))


def run_manifest(run_dir: Path, category: str):
    """The validated manifest of a `dvc repro` folder, its relative paths made absolute."""
    rows = read_manifest(run_dir / "data" / "validated" / f"{category}.csv")
    for col in ("path", "mask_path"):
        rows[col] = [str(run_dir / p) if isinstance(p, str) and p and not Path(p).is_absolute() else p for p in rows[col]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    params = load_params(args.run_dir / "params.yaml")
    size = params.dataset.image_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for category in params.dataset.categories:
            manifest = run_manifest(args.run_dir, category)
            bundle = Path(tmp) / category
            shutil.copytree(args.run_dir / "bundles" / category, bundle)
            start = time.perf_counter()
            add_int8_graph(bundle, manifest, size)
            quantise_seconds = time.perf_counter() - start
            parity = json.loads((bundle / METADATA_FILE).read_text())["int8"]["parity_on_test"]
            fp32, int8 = OnnxBundle(bundle), OnnxBundle(bundle, precision="int8")
            graph, _ = load_model(bundle)
            latency = {}
            for batch in (1, 8):
                x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
                with torch.no_grad():
                    latency[f"eager_torch_b{batch}_ms"] = median_ms(lambda: graph(torch.from_numpy(x)), args.repeats)
                latency[f"onnx_fp32_b{batch}_ms"] = median_ms(lambda: fp32(x), args.repeats)
                latency[f"onnx_int8_b{batch}_ms"] = median_ms(lambda: int8(x), args.repeats)
            row = {"category": category, "image_size": size, "quantise_seconds": quantise_seconds, **parity, **latency,
                   "passes": bool(parity["image_score_spearman"] >= 0.999
                                  and abs(parity["fp32_image_auroc"] - parity["int8_image_auroc"]) <= 0.005
                                  and abs(parity["fp32_pixel_auroc"] - parity["int8_pixel_auroc"]) <= 0.005)}
            rows.append(row)
            print(json.dumps(row))
    lines = ["| category | score Spearman | image AUROC fp32 → int8 | pixel AUROC fp32 → int8 | bar | ms, batch 1: torch / ORT fp32 / ORT int8 | ms, batch 8: torch / ORT fp32 / ORT int8 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['category']} | {r['image_score_spearman']:.4f} | {100 * r['fp32_image_auroc']:.1f} → {100 * r['int8_image_auroc']:.1f} | "
                     f"{100 * r['fp32_pixel_auroc']:.1f} → {100 * r['int8_pixel_auroc']:.1f} | {'met' if r['passes'] else 'not met'} | "
                     + " / ".join(f"{r[f'{k}_b1_ms']:.1f}" for k in ("eager_torch", "onnx_fp32", "onnx_int8")) + " | "
                     + " / ".join(f"{r[f'{k}_b8_ms']:.1f}" for k in ("eager_torch", "onnx_fp32", "onnx_int8")) + " |")
    print("\n".join(lines))
    out = RESULTS
    (out / "int8_bundle_cpu.json").write_text(json.dumps({"machine": machine(), "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    (out / "int8_bundle_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
