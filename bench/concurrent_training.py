"""Two trainings at once against the same two one after the other, on this host.

    python -m bench.concurrent_training [--iterations 150] [--category widget]

Each training is its own process (`urd train`-like: the library's train_category on the demo at
params.yaml's settings, ``--iterations`` iterations). Three cases, each timed as the wall time for
both trainings to finish:

* sequential: one, then the other (each alone on the host; threads: auto = all usable cores);
* concurrent, budgeted: both at once with ``threads: auto`` (urd/runtime.py shares the cores
  between them: one thread each on 2 cores);
* concurrent, unbudgeted: both at once with every core's worth of threads each (``URD_THREADS`` =
  the core count: what every process did before the budget).

Goal: concurrent (budgeted) total <= 1.2x sequential. Writes bench/results/concurrent_training_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]


def worker(out: str, iterations: int, category: str, data: str) -> None:
    from urd.config import load_params
    from urd.data.manifest import build_manifest
    from urd.train import train_category

    params = load_params(ROOT / "params.yaml")
    train = params.train.model_copy(update={"iterations": iterations, "checkpoint_every": iterations})
    params = params.model_copy(update={"train": train})
    manifest = build_manifest(params.dataset.name, data, category, params.dataset.val_fraction, progress=False)
    started = time.perf_counter()
    summary = train_category(params, category, manifest, Path(out) / "model", progress=False)
    Path(out, "result.json").write_text(json.dumps({"seconds": time.perf_counter() - started, "threads": summary["threads"],
                                                     "threads_min": summary["threads_min"], "threads_max": summary["threads_max"],
                                                     "threads_source": summary["threads_source"], "precision": summary["precision"]}))


def launch(tmp: Path, name: str, args, env: dict[str, str]) -> subprocess.Popen:
    out = tmp / name
    out.mkdir()
    return subprocess.Popen([sys.executable, "-m", __spec__.name, "--worker", str(out), "--iterations", str(args.iterations), "--category", args.category,
                             "--data", args.data], env=env, cwd=ROOT)


def case(tmp: Path, label: str, args, concurrent: bool, threads: str | None) -> dict:
    env = os.environ | {"URD_CPU_REGISTRY": str(tmp / f"registry-{label}")}
    env.pop("URD_THREADS", None)
    if threads:
        env["URD_THREADS"] = threads
    started = time.perf_counter()
    runs = []
    for i in range(2):
        proc = launch(tmp, f"{label}-{i}", args, env)
        if concurrent:
            runs.append(proc)
        else:
            assert proc.wait() == 0
    for proc in runs:
        assert proc.wait() == 0
    total = time.perf_counter() - started
    results = [json.loads((tmp / f"{label}-{i}" / "result.json").read_text()) for i in range(2)]
    return {"case": label, "concurrent": concurrent, "URD_THREADS": threads or "unset (auto)", "total_seconds": total,
            "train_seconds": [r["seconds"] for r in results], "threads": [[r["threads_min"], r["threads_max"]] for r in results],
            "threads_source": results[0]["threads_source"], "precision": results[0]["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--category", default="widget")
    parser.add_argument("--data", default=str(ROOT / "data/raw/demo"))
    parser.add_argument("--worker", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.iterations, args.category, args.data)
        return
    if not Path(args.data, args.category).is_dir():
        from urd.data.demo import generate_demo

        generate_demo(args.data)
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(case(Path(tmp), "sequential", args, False, None))
        rows.append(case(Path(tmp), "concurrent, budgeted (auto)", args, True, None))
        rows.append(case(Path(tmp), "concurrent, unbudgeted", args, True, str(cores)))
    base = rows[0]["total_seconds"]
    table = Table(title=f"two trainings of {args.category}, {args.iterations} iterations each, {cores} cores")
    for col in ("case", "threads per job (min-max)", "total s", "vs sequential", "each training s"):
        table.add_column(col)
    for r in rows:
        r["vs_sequential"] = r["total_seconds"] / base
        table.add_row(r["case"], ", ".join(f"{a}-{b}" for a, b in r["threads"]), f"{r['total_seconds']:.1f}", f"{r['vs_sequential']:.2f}x",
                      ", ".join(f"{s:.1f}" for s in r["train_seconds"]))
    Console(width=130).print(table)
    out = RESULTS / "concurrent_training_cpu.json"
    out.write_text(json.dumps({"machine": machine(), "iterations": args.iterations, "category": args.category, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
