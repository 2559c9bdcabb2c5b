"""Parameter counts and inference time per image of the URD inference graph (teacher -> student -> map).

    python -m bench.model_inference [--device cpu|cuda] [--repeats 5]

Prints a table and writes bench/results/model_inference_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine

from urd.model import URD

CASES = [("resnet18", 128), ("wide_resnet50_2", 256)]


def params_of(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def time_batch(graph: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds per forward pass, after one warm-up pass."""
    times = []
    with torch.inference_mode():
        graph(x)
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            graph(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for backbone, size in CASES:
        model = URD(backbone, image_size=size)
        graph = model.inference_graph().to(args.device)
        row = {
            "backbone": backbone,
            "image_size": size,
            "params_inference_graph": params_of(graph),
            "params_teacher": params_of(model.teacher),
            "params_student": params_of(model.student),
            "params_expert_training_only": params_of(model.expert),
        }
        for batch in (1, 8):
            x = torch.randn(batch, 3, size, size, device=args.device)
            seconds = time_batch(graph, x, args.repeats)
            row[f"ms_per_image_batch{batch}"] = round(1000 * seconds / batch, 2)
        rows.append(row)

    table = Table(title=f"URD inference graph on {args.device}")
    for col in ("backbone", "size", "params (graph)", "teacher", "student", "ms/img b=1", "ms/img b=8"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["backbone"], str(r["image_size"]), f"{r['params_inference_graph']:,}", f"{r['params_teacher']:,}",
            f"{r['params_student']:,}", f"{r['ms_per_image_batch1']:.1f}", f"{r['ms_per_image_batch8']:.1f}",
        )
    Console(width=150).print(table)
    out = RESULTS / f"model_inference_{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
