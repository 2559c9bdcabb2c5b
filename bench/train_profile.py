"""Where a training iteration's time goes at the demo settings, and how close it runs to this
machine's roof.

    python -m bench.train_profile [--iterations 30] [--warmup 5] [--precisions fp32 bf16] [--workers 0 1 2] [--rounds 2]

In one run, on one machine:

1. **Roofs**: GFLOP/s of a 2048x2048 matmul, of a dense 3x3 convolution (8x64x48x48 -> 64) and of
   a depthwise 3x3 convolution (8x240x24x24, Lite0's MBConv kind: memory-bound), fp32 and bf16,
   best of both memory formats.
2. **FLOPs of one training iteration** (``torch.utils.flop_counter.FlopCounterMode``: the
   convolutions and matmuls of forward and backward; synthesis is not counted).
3. **Training step alone** (fixed random batch, no loading, no synthesis) per precision and memory
   format, with the normal images' teacher features encoded in the step ("encoded") or already
   known ("cached", what ``urd.train.FrozenFeatureCache`` gives the loop when the teacher is
   frozen), the cases taking turns: median ms/iteration, images/s, GFLOP/s and % of the fp32 and
   bf16 roofs.
4. **The library's loop** (``urd.train.train_category`` on the demo's last category, params.yaml)
   per precision and ``train.num_workers``, taking turns ``--rounds`` times: median ms/iteration
   after the warm-up (at least one epoch, so that the frozen encoders' feature caches are full),
   images/s.
5. **Profile** of the default configuration (torch.profiler over the ``urd.*`` ranges that the loop
   and ``train_step`` mark): data loading, synthesis, teacher features, student forward, backward,
   optimizer, and what no range covers (loop overhead: progress bar, logging). "Outside torch ops"
   is a range's time not spent in any torch operator: Python and dispatch overhead.

Prints the tables and writes bench/results/train_profile_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode


from urd.config import load_params
from urd.data.manifest import ingest_category
from urd.checkpoint import build_model
from urd.model.urd import URD
from urd.runtime import native_bf16
from urd.train import make_optimizers, train_category, train_step

PHASES = ("data", "synthesis", "expert", "teacher_forward", "teacher_backward", "teacher_features", "student_forward",
          "student_backward", "optimizer")


def autocast(precision: str):
    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext


def best_seconds(fn, repeats: int = 10) -> float:
    from bench.timing import timings  # imported here: bench/train_loop_ab.py loads this file without the bench package

    return min(timings(fn, repeats))


def roofs(precisions: list[str]) -> dict[str, dict[str, float]]:
    """GFLOP/s of the kernels that bound this machine, per precision."""
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for precision in precisions:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
            row = {"matmul": 2 * 2048**3 / best_seconds(lambda: a @ b) / 1e9}
            for name, (n, c, s, groups) in {"conv3x3": (8, 64, 48, 1), "depthwise3x3": (8, 240, 24, 240)}.items():
                weight = torch.randn(c, c // groups, 3, 3, dtype=dtype)
                flops = 2 * n * c * s * s * (c // groups) * 9
                best = 0.0
                for memory_format in (torch.contiguous_format, torch.channels_last):
                    x = torch.randn(n, c, s, s, dtype=dtype).contiguous(memory_format=memory_format)
                    w = weight.contiguous(memory_format=memory_format)
                    best = max(best, flops / best_seconds(lambda: F.conv2d(x, w, padding=1, groups=groups)) / 1e9)
                row[name] = best
            out[precision] = row
    return out


def batch_of(size: int, batch: int, channels_last: bool):
    gen = torch.Generator().manual_seed(0)
    normal, anomalous = torch.rand(batch, 3, size, size, generator=gen), torch.rand(batch, 3, size, size, generator=gen)
    mask = (torch.rand(batch, 1, size, size, generator=gen) > 0.5).float()
    if channels_last:
        normal, anomalous = (t.contiguous(memory_format=torch.channels_last) for t in (normal, anomalous))
    return normal, anomalous, mask


def known_teacher_features(model: "URD", normal: torch.Tensor, precision: str) -> list[torch.Tensor]:
    """What urd.train.FrozenFeatureCache hands train_step once an image has been seen."""
    # Imported here: bench/train_loop_ab.py loads this file beside an earlier urd that lacks it.
    from urd.train import FrozenFeatureCache

    model.train()  # the frozen teacher stays in eval mode
    return FrozenFeatureCache(len(normal))(model.teacher, normal, torch.arange(len(normal)), autocast(precision)())


def steady_state_warmup(manifest, batch_size: int, at_least: int) -> int:
    """Warm-up iterations before the loop is timed: at least one epoch, which fills the frozen
    encoders' feature caches (urd.train.FrozenFeatureCache)."""
    return max(at_least, int((manifest["split"] == "train").sum()) // batch_size + 1)


def iteration_flops(params, cached: bool = False) -> int:
    """FLOPs of one train_step; ``cached``: with the frozen teacher's features of I_n known, as the
    loop runs after its first epoch when the expert is off."""
    torch.manual_seed(params.seed)
    model = build_model(params)
    optimizers = make_optimizers(model, params.train)
    batch = batch_of(params.dataset.image_size, params.train.batch_size, False)
    known = known_teacher_features(model, batch[0], "fp32") if cached else None
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, optimizers, *batch, params.model.teacher_synthetic_term, teacher_normal=known)
    return counter.get_total_flops()


def step_speeds(params, cases: list[tuple[str, bool, bool]], iterations: int, warmup: int, rounds: int = 3) -> list[float]:
    """Median seconds of ``train_step`` on a fixed batch for each (precision, channels_last, cached)
    case. The cases take turns, ``rounds`` times ``iterations // rounds`` steps each, so that a noisy
    neighbour on a shared host slows every case alike; the result is the median over all steps."""
    setups = []
    for precision, channels_last, cached in cases:
        torch.manual_seed(params.seed)
        model = build_model(params)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizers = make_optimizers(model, params.train)
        batch = batch_of(params.dataset.image_size, params.train.batch_size, channels_last)
        known = known_teacher_features(model, batch[0], precision) if cached else None
        for _ in range(warmup):
            train_step(model, optimizers, *batch, params.model.teacher_synthetic_term, autocast(precision)(), known)
        setups.append((model, optimizers, batch, precision, known, []))
    for _ in range(rounds):
        for model, optimizers, batch, precision, known, times in setups:
            for _ in range(max(iterations // rounds, 1)):
                start = time.perf_counter()
                train_step(model, optimizers, *batch, params.model.teacher_synthetic_term, autocast(precision)(), known)
                times.append(time.perf_counter() - start)
    return [statistics.median(times) for *_, times in setups]


def loop_run(params, category: str, manifest, precision: str, workers: int, iterations: int, warmup: int, profile: bool = False):
    """Median seconds per iteration of the library's loop (and its profile when asked)."""
    train = params.train.model_copy(update={"precision": precision, "num_workers": workers, "iterations": warmup + iterations,
                                            "checkpoint_every": warmup + iterations, "log_every": 1})
    params = params.model_copy(update={"train": train})
    stamps: list[float] = []
    profiler = None
    if profile:
        schedule = torch.profiler.schedule(wait=warmup - 1, warmup=1, active=iterations)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule)

    def on_log(done, losses):
        stamps.append(time.perf_counter())
        if profiler is not None:
            profiler.step()

    with tempfile.TemporaryDirectory() as tmp, (profiler or contextlib.nullcontext()):
        train_category(params, category, manifest, Path(tmp) / "m", progress=False, on_log=on_log)
    per_iteration = statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))
    if profiler is None:
        return per_iteration, None
    events = {e.key: e for e in profiler.key_averages()}
    phases = {}
    for name in PHASES:
        event = events.get(f"urd.{name}")
        if event is not None:
            phases[name] = {"ms": event.cpu_time_total / 1000 / iterations, "outside_ops_ms": event.self_cpu_time_total / 1000 / iterations}
    return per_iteration, phases


def main() -> None:
    from bench.machine import RESULTS, machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precisions", nargs="*", default=None, help="default: fp32, and bf16 where this CPU runs it natively")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="turns of the loop configurations (median over them)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="synthesis.dtd_root")  # the demo trains on procedural textures
    precisions = args.precisions or (["fp32", "bf16"] if native_bf16(torch.device("cpu")) else ["fp32"])
    params = load_params("params.yaml")
    category = params.dataset.categories[-1]
    params = params.for_category(category)
    console = Console(width=130)
    lines: list[str] = []

    def show(table: Table) -> None:
        console.print(table)
        plain = Console(file=io.StringIO(), width=130, color_system=None)
        plain.print(table)
        lines.append("```\n" + plain.file.getvalue().rstrip() + "\n```\n")

    def show_text(text: str) -> None:
        console.print(text)
        lines.append(text + "\n")

    roof = roofs(sorted(set(precisions) | {"fp32"}))
    table = Table(title="Roofs measured in this run (GFLOP/s)")
    for col in ("precision", "matmul 2048²", "conv 3x3 dense", "conv 3x3 depthwise"):
        table.add_column(col, justify="right")
    for precision, row in roof.items():
        table.add_row(precision, f"{row['matmul']:.0f}", f"{row['conv3x3']:.0f}", f"{row['depthwise3x3']:.1f}")
    show(table)
    peak = {precision: max(row["matmul"], row["conv3x3"]) for precision, row in roof.items()}

    batch = params.train.batch_size
    caching = not params.model.expert  # a frozen teacher: the loop caches its features of I_n
    flops = {False: iteration_flops(params)}
    show_text(f"FLOPs of one training iteration (batch {batch}, {params.dataset.image_size} px, {params.model.backbone}): "
              f"{flops[False] / 1e9:.2f} GFLOP")
    if caching:
        flops[True] = iteration_flops(params, cached=True)
        show_text(f"... with the frozen teacher's features of I_n cached (the loop, from its second epoch on): {flops[True] / 1e9:.2f} GFLOP")

    cases = [(precision, channels_last, False) for precision in precisions for channels_last in (False, True)]
    cases += [(precision, True, True) for precision in precisions if caching]
    step_rows = []
    for (precision, channels_last, cached), seconds in zip(cases, step_speeds(params, cases, args.iterations, args.warmup)):
        step_rows.append({"precision": precision, "memory_format": "channels_last" if channels_last else "contiguous",
                          "teacher_features_of_normal": "cached" if cached else "encoded", "gflop": flops[cached] / 1e9,
                          "ms_per_iteration": 1000 * seconds, "images_per_s": batch / seconds, "gflops": flops[cached] / seconds / 1e9})
    table = Table(title="Training step alone")
    for col in ("precision", "memory format", "F_T(I_n)", "GFLOP", "ms / it", "images / s", "GFLOP/s", "% fp32 roof", "% own roof"):
        table.add_column(col, justify="right")
    for r in step_rows:
        table.add_row(r["precision"], r["memory_format"], r["teacher_features_of_normal"], f"{r['gflop']:.2f}", f"{r['ms_per_iteration']:.0f}",
                      f"{r['images_per_s']:.1f}", f"{r['gflops']:.1f}",
                      f"{100 * r['gflops'] / peak['fp32']:.0f}%", f"{100 * r['gflops'] / peak[r['precision']]:.0f}%")
    show(table)

    manifest = ingest_category(params, category, progress=False)
    warmup = steady_state_warmup(manifest, batch, args.warmup)
    flops = flops[caching]
    configs = [(precision, workers) for precision in precisions for workers in args.workers]
    rounds: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):  # configurations take turns, as in the step table
        for precision, workers in configs:
            rounds[(precision, workers)].append(loop_run(params, category, manifest, precision, workers, args.iterations, warmup)[0])
    loop_rows = []
    for (precision, workers), times in rounds.items():
        seconds = statistics.median(times)
        loop_rows.append({"precision": precision, "num_workers": workers, "ms_per_iteration": 1000 * seconds,
                          "images_per_s": batch / seconds, "gflops": flops / seconds / 1e9, "rounds_ms": [1000 * t for t in times]})
    table = Table(title=f"The training loop (train_category, {category}; median after {warmup} warm-up iterations; {flops / 1e9:.2f} GFLOP/it)")
    for col in ("precision", "num_workers", "ms / it", "images / s", "GFLOP/s", "% fp32 roof"):
        table.add_column(col, justify="right")
    for r in loop_rows:
        table.add_row(r["precision"], str(r["num_workers"]), f"{r['ms_per_iteration']:.0f}", f"{r['images_per_s']:.1f}",
                      f"{r['gflops']:.1f}", f"{100 * r['gflops'] / peak['fp32']:.0f}%")
    show(table)

    default_precision = "bf16" if "bf16" in precisions else "fp32"
    profiled, phases = loop_run(params, category, manifest, default_precision, params.train.num_workers, args.iterations, warmup,
                                profile=True)
    covered = sum(v["ms"] for v in phases.values())
    phases["loop overhead"] = {"ms": max(1000 * profiled - covered, 0.0), "outside_ops_ms": max(1000 * profiled - covered, 0.0)}
    table = Table(title=f"Profile of one iteration ({default_precision}, num_workers {params.train.num_workers}; "
                        f"{1000 * profiled:.0f} ms/it under the profiler)")
    for col in ("phase", "ms / it", "share", "outside torch ops (ms)"):
        table.add_column(col, justify="right")
    for name, v in phases.items():
        table.add_row(name, f"{v['ms']:.1f}", f"{100 * v['ms'] / (1000 * profiled):.0f}%", f"{v['outside_ops_ms']:.1f}")
    show(table)

    result = {"machine": machine(), "settings": {"backbone": params.model.backbone, "image_size": params.dataset.image_size,
              "batch_size": batch, "expert": params.model.expert, "category": category, "iterations": args.iterations, "warmup": warmup},
              "roofs_gflops": roof, "iteration_gflop": flops / 1e9, "step": step_rows, "loop": loop_rows,
              "profile": {"precision": default_precision, "num_workers": params.train.num_workers,
                          "ms_per_iteration": 1000 * profiled, "phases": phases}}
    out = RESULTS / "train_profile_cpu"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    header = (f"# Training profile ({m['cpu']}, {m['cores']} cores, flags: {m['cpu_flags']}, torch {m['torch']}, "
              f"{m['torch_threads']} threads, commit {m['git_commit']})\n\n")
    out.with_suffix(".md").write_text(header + "\n".join(lines))
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
