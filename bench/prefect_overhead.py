"""What Prefect orchestration costs on top of the plain commands: a real `prefect server`'s
start-up, then the `retrain` flow against `dvc repro` + `python -m pipeline promote` per category,
on a tiny real run (2 categories, 64 px, 2 iterations) and on a no-op run (nothing changed).

    python -m bench.prefect_overhead

Runs in two temporary copies of the repository (one per side), a Prefect server with a temporary
PREFECT_HOME on a free loopback port, and local SQLite MLflow stores; everything is removed and
stopped at the end. Writes bench/results/prefect_overhead_cpu.json and .md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["tiles", "widget"]
TINY = {
    "dataset": {"categories": CATEGORIES, "image_size": 64, "min_train_images": 4},
    "train": {"iterations": 2, "batch_size": 2, "checkpoint_every": 2, "num_workers": 0},
    "synthesis": {"foreground": {"widget": "otsu"}},
    "evaluate": {"gallery_size": 1},
    "package": {"formats": ["onnx"]},
    "promote": {"min_image_auroc": 0.0, "min_pixel_auroc": 0.0, "min_aupro": 0.0},
}


def copy_repo(dest: Path) -> None:
    from urd.config import Params

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(TINY).model_dump(mode="json")))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - start


def plain(cwd: Path, env: dict[str, str]) -> dict[str, float]:
    out = {"dvc_repro": timed([sys.executable, "-m", "dvc", "repro"], cwd, env)}
    for category in CATEGORIES:
        out[f"promote_{category}"] = timed([sys.executable, "-m", "pipeline", "promote", "--category", category], cwd, env)
    out["total"] = sum(out.values())
    return out


def flow(cwd: Path, env: dict[str, str]) -> dict[str, float]:
    return {"total": timed([sys.executable, "-c", "from pipeline.flows import retrain; retrain()"], cwd, env)}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="urd-prefect-bench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    base.pop("MLFLOW_TRACKING_URI", None)
    server_env = base | {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    server = None
    try:
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            try:
                if opener.open(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.perf_counter() - started > 180:
                    raise SystemExit("the Prefect server did not start in 180 s")
                time.sleep(0.2)
        startup = time.perf_counter() - started
        print(f"server up in {startup:.1f} s")
        rows = {}
        for side in ("plain", "prefect"):
            (tmp / side).mkdir()
            copy_repo(tmp / side)
        print("tiny run: dvc repro + promote ...")
        rows["tiny_plain"] = plain(tmp / "plain", base)
        print("tiny run: retrain flow ...")
        rows["tiny_prefect"] = flow(tmp / "prefect", server_env)
        print("no-op: dvc repro + promote ...")
        rows["noop_plain"] = plain(tmp / "plain", base)
        print("no-op: retrain flow ...")
        rows["noop_prefect"] = flow(tmp / "prefect", server_env)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    table = Table(title="Prefect retrain flow vs the plain commands (2 categories, tiny params)")
    for column in ("run", "dvc repro + promote (s)", "retrain flow (s)", "overhead (s)"):
        table.add_column(column, justify="right" if column != "run" else "left")
    md = ["| run | dvc repro + promote per category (s) | retrain flow (s) | overhead (s) |", "|---|---|---|---|"]
    for run, label in (("tiny", "tiny real run"), ("noop", "no-op (nothing changed)")):
        a, b = rows[f"{run}_plain"]["total"], rows[f"{run}_prefect"]["total"]
        table.add_row(label, f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}")
        md.append(f"| {label} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    table.add_row("server start-up", "", "", f"{startup:.1f}")
    md.append(f"| `prefect server start` until healthy | | | {startup:.1f} |")
    Console().print(table)
    info = machine()
    result = {"machine": info, "server_startup_seconds": startup, "runs": rows, "params": TINY}
    out = RESULTS / "prefect_overhead_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + f"\n\nMachine: {info['cpu']}, {info['cores']} cores; {info.get('cpu_flags', '')}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
