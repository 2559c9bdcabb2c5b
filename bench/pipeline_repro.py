"""Wall time of a cold `dvc repro` of the demo (from a fresh copy of the repository: demo data,
every category's stages, MLflow tracking and registration) and of the no-op `dvc repro` after it.

    python -m bench.pipeline_repro [--keep DIR]

Runs in a temporary copy of the git-tracked files with the committed params.yaml, so nothing in
this checkout changes. Writes bench/results/pipeline_repro_cpu.json with the per-stage times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine

REPO = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def repro(cwd: Path) -> tuple[float, list[tuple[str, float]]]:
    """Total seconds and (stage, seconds) in the order run, from the timestamps of DVC's output."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages, current, began = [], None, start
    for line in process.stdout:
        found = re.search(r"Running stage '([^']+)'", line)
        if found:
            now = time.perf_counter()
            if current:
                stages.append((current, now - began))
            current, began = found.group(1), now
            print(f"  {found.group(1)}", flush=True)
    if process.wait() != 0:
        raise SystemExit(f"dvc repro failed in {cwd}")
    end = time.perf_counter()
    if current:
        stages.append((current, end - began))
    return end - start, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, default=None, help="run in this (new) folder and keep it")
    args = parser.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="urd-repro-"))
    tmp.mkdir(parents=True, exist_ok=False if args.keep else True)
    try:
        copy_repo(tmp)
        print("cold dvc repro ...")
        cold, stages = repro(tmp)
        print("no-op dvc repro ...")
        noop, rerun = repro(tmp)
        metrics = {p.stem: json.loads(p.read_text()) for p in sorted((tmp / "metrics").glob("*.json"))}
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title="dvc repro of the demo (params.yaml defaults)")
    table.add_column("run")
    table.add_column("seconds", justify="right")
    table.add_row("cold (fresh copy)", f"{cold:.0f}")
    table.add_row("no-op (nothing changed)", f"{noop:.1f}")
    for name, seconds in stages:
        table.add_row(f"  {name}", f"{seconds:.1f}")
    Console().print(table)
    result = {"machine": machine(), "cold_seconds": cold, "noop_seconds": noop, "noop_stages_run": [s for s, _ in rerun],
              "stages": [{"stage": s, "seconds": t} for s, t in stages],
              "test_metrics": {c: {k: m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")} for c, m in metrics.items()}}
    out = RESULTS / "pipeline_repro_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
