"""Training-loop speed of this checkout against an earlier commit, same machine, same run.

    python -m bench.train_loop_ab --before 47bb5fd [--iterations 30] [--warmup 5] [--rounds 2]
                                  [--before-precisions fp32 [bf16]] [--name cpu]

Checks the earlier commit out into a temporary git worktree and times the library's loop
(``urd.train.train_category`` at params.yaml's demo settings, as bench/train_profile.py does:
median ms/iteration after the warm-up, at least one epoch) alternately in both trees, each configuration in its own
process: the earlier commit with ``num_workers`` from its params.yaml, in fp32 (or the
``--before-precisions`` given, for an earlier commit that has bf16 too) and this checkout at each
precision the CPU runs natively. Alternating rounds keep a noisy neighbour from favouring one side.
Writes bench/results/train_loop_ab_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def worker(precision: str, iterations: int, warmup: int) -> dict:
    """Runs inside the tree on PYTHONPATH: its urd, its params.yaml, and this checkout's measuring
    code (bench/train_profile.py, loaded by path so that both sides are timed alike)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_profile_of_this_checkout", BENCH / "train_profile.py")
    train_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_profile)
    loop_run, steady_state_warmup = train_profile.loop_run, train_profile.steady_state_warmup

    from urd.config import load_params
    from urd.data.manifest import ingest_category

    params = load_params("params.yaml")
    category = params.dataset.categories[-1]
    params = params.for_category(category)
    workers = params.train.num_workers
    if workers == "auto":
        from urd.runtime import resolve_num_workers

        workers = resolve_num_workers(workers)
    precision = precision if precision != "default" else params.train.precision
    manifest = ingest_category(params, category, progress=False)
    warmup = steady_state_warmup(manifest, params.train.batch_size, warmup)  # the same on both sides
    seconds, _ = loop_run(params, category, manifest, precision, workers, iterations, warmup)
    return {"precision": precision, "num_workers": workers, "warmup": warmup, "ms_per_iteration": 1000 * seconds,
            "images_per_s": params.train.batch_size / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before-precisions", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    parser.add_argument("--name", default="cpu", help="results file suffix")
    parser.add_argument("--worker", nargs=2, default=None, metavar=("PRECISION", "TREE"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.iterations, args.warmup)))
        return
    from bench.machine import RESULTS, machine

    from urd.runtime import native_bf16

    after_precisions = ["fp32", "bf16"] if native_bf16(torch.device("cpu")) else ["fp32"]
    before_commit = subprocess.run(["git", "rev-parse", "--short", args.before], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), before_commit], check=True, cwd=ROOT)
        try:
            (tree / "data" / "raw").mkdir(parents=True, exist_ok=True)
            (tree / "data" / "raw" / "demo").symlink_to(ROOT / "data" / "raw" / "demo")  # the same generated demo images
            cases = [("before", tree, p) for p in args.before_precisions] + [("after", ROOT, p) for p in after_precisions]
            for _ in range(args.rounds):
                for side, where, precision in cases:
                    env = {**os.environ, "PYTHONPATH": str(where)}
                    cmd = [sys.executable, str(BENCH / "train_loop_ab.py"), "--before", args.before, "--iterations", str(args.iterations), "--warmup",
                           str(args.warmup), "--worker", precision, str(where)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=where, env=env)
                    runs.setdefault(f"{side} {precision}", []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False, cwd=ROOT)
    rows = []
    for name, results in runs.items():
        ms = statistics.median(r["ms_per_iteration"] for r in results)
        rows.append({"case": name, "num_workers": results[0]["num_workers"], "warmup": results[0]["warmup"], "ms_per_iteration": ms,
                     "images_per_s": statistics.median(r["images_per_s"] for r in results),
                     "rounds_ms": [r["ms_per_iteration"] for r in results]})
    base = rows[0]["images_per_s"]
    table = Table(title=f"Training loop, {before_commit} vs this checkout (median ms/iteration, {args.rounds} alternating rounds)")
    for col in ("case", "num_workers", "ms / it", "images / s", f"vs {rows[0]['case']}", "rounds (ms)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["case"], str(r["num_workers"]), f"{r['ms_per_iteration']:.0f}", f"{r['images_per_s']:.1f}",
                      f"{r['images_per_s'] / base:.2f}x", " ".join(f"{x:.0f}" for x in r["rounds_ms"]))
    Console(width=120).print(table)
    out = RESULTS / f"train_loop_ab_{args.name}.json"
    out.write_text(json.dumps({"machine": machine(), "before": before_commit, "iterations": args.iterations, "warmup_at_least": args.warmup,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
