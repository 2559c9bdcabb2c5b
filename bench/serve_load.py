"""Throughput and latency of the inspection service (`urd serve`) under load, against bare ONNX
Runtime on the same bundle, in one run on one machine.

    python -m bench.serve_load [--bundle bundles/widget] [--seconds 20] [--concurrency 1 4 16]

1. Bare ONNX Runtime: the bundle's fp32 graph called in a loop on prepared images at batch 1 and 8
   (no HTTP, no decoding, no ledger): the ceiling.
2. The service in its own process (real uvicorn, ledger on SQLite in WAL mode with synchronous
   writes, the content-addressed image store), fed PNG files over loopback by an asyncio httpx
   client at each concurrency for ``--seconds`` after a warm-up: images/s, p50/p99 latency, the
   mean micro-batch, and from the service's own Prometheus metrics where a request's time goes
   (decoding + resizing, ONNX Runtime, ledger + image store).

Both sides get the same thread budget for ONNX Runtime (``--threads``, default the host's cores).
The client shares the host with the service, as a camera station on the same box would.

Without ``--bundle`` a bundle of params.yaml's model (backbone, image size) is made from a few
iterations on a small generated demo: speed does not depend on how well the model is trained.
Writes bench/results/serve_load_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine

from urd.data.images import read_image
from urd.inference import OnnxBundle, expand_inputs

TOKEN = "bench-line-token-0123456789"


PROFILES = {"demo": "params.yaml", "paper": "params/paper.yaml"}


def make_bundle(folder: Path, profile: str = "demo") -> Path:
    """A calibrated bundle of a profile's model (backbone, image size, head) from a few training
    iterations on a small generated demo; the paper's backbone without its ImageNet weights (they
    are not on this machine, and speed does not depend on them)."""
    from urd.config import load_params
    from urd.data.demo import DemoSpec, generate_demo

    base = load_params(PROFILES[profile])
    generate_demo(folder / "demo", DemoSpec(train=24, test_good=8, test_per_defect=4))
    params = base.model_dump(exclude={"overrides"})
    params["dataset"] |= {"name": "demo", "root": str(folder / "demo"), "categories": ["widget"], "val_fraction": 0.25}
    params["train"] |= {"iterations": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "num_workers": 0}
    params["package"] |= {"formats": ["onnx"], "quantize": "none"}
    if profile != "demo":
        params["model"] |= {"weights": "none"}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    p, model = str(folder / "params.yaml"), str(folder / "model")
    for args in (["train", "--category", "widget", "--out", model], ["calibrate", "--model", model],
                 ["export", "--model", model, "--out", str(folder / "bundle")]):  # export writes the challenge set too
        subprocess.run([sys.executable, "-m", "urd", *args, "--params", p], check=True, stdout=subprocess.DEVNULL)
    return folder / "bundle"


def bare_ort(bundle: Path, images: list[np.ndarray], batch: int, seconds: float) -> dict:
    runner = OnnxBundle(bundle)
    size = int(runner.metadata["preprocessing"]["image_size"])
    x = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1) / np.float32(255) for im in images])
    batches = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)] or [np.repeat(x[:1], batch, 0)]
    for b in batches[:3]:
        runner(b)  # warm-up
    times, done, start, cpu = [], 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        b = batches[len(times) % len(batches)]
        t = time.perf_counter()
        runner(b)
        times.append(time.perf_counter() - t)
        done += len(b)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"case": f"bare ORT batch {batch}", "images_per_s": done / elapsed, "service_cpu_ms_per_image": 1000 * cpu / done, "p50_ms": 1000 * statistics.median(times),
            "p99_ms": 1000 * float(np.percentile(times, 99)), "calls": len(times)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(bundle: Path, work: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (work / "params.yaml").write_text(yaml.safe_dump({"dataset": {"categories": ["widget"]},
                                                      "serve": {"image_store": str(work / "images"), "tokens": str(work / "tokens.json")}}))
    env = os.environ | {"URD_TOKENS_LINE": f"bench:{TOKEN}", "URD_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "urd", "serve", "--params", str(work / "params.yaml"), "--bundle", f"widget={bundle}",
                                "--ledger", f"sqlite:///{work / 'ledger.db'}", "--port", str(port)], cwd=work, env=env,
                               stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"urd serve exited: {(work / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"urd serve did not get ready: {(work / 'serve.log').read_text()[-2000:]}")


def metric_sums(text: str) -> dict[str, float]:
    """name -> value of the unlabelled-by-bucket series (_sum, _count, counters) summed over labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{.*\})? ([0-9.eE+-]+)$", line)
        if m and not m.group(1).endswith("_bucket"):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, pid: int, files: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, limits=limits, timeout=60) as client:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        measure_from, measure_to = begin + warmup, begin + warmup + seconds

        cpu: dict[str, float] = {}

        async def mark() -> None:  # CPU used by the service and by this client over the measured stretch
            await asyncio.sleep(warmup)
            cpu.update(service=cpu_seconds(pid), client=time.process_time())
            await asyncio.sleep(seconds)
            cpu.update(service=cpu_seconds(pid) - cpu["service"], client=time.process_time() - cpu["client"])

        async def worker(k: int) -> None:
            i = k
            while loop.time() < measure_to:
                t = loop.time()
                r = await client.post("/v1/inspect/widget", content=files[i % len(files)])
                if measure_from <= loop.time() <= measure_to:  # answers completed in the window, whenever they started
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        latencies.append(loop.time() - t)
                i += concurrency

        before = metric_sums((await client.get("/metrics")).text)
        await asyncio.gather(mark(), *(worker(k) for k in range(concurrency)))
        after = metric_sums((await client.get("/metrics")).text)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = max(delta.get("urd_batch_size_count", 0.0), 1.0)
    answered = max(delta.get("urd_prepare_seconds_count", 0.0), 1.0)
    lat = np.array(latencies)
    return {
        "case": f"service, concurrency {concurrency}", "concurrency": concurrency, "images_per_s": len(lat) / seconds,
        "p50_ms": 1000 * float(np.median(lat)), "p99_ms": 1000 * float(np.percentile(lat, 99)), "statuses": statuses,
        "service_cpu_ms_per_image": 1000 * cpu["service"] / max(len(lat), 1), "client_cpu_ms_per_image": 1000 * cpu["client"] / max(len(lat), 1),
        "mean_batch": delta.get("urd_batch_size_sum", 0.0) / n,
        # per answered image, from the service's own histograms (warm-up and tail included)
        "ms_prepare_per_image": 1000 * delta.get("urd_prepare_seconds_sum", 0.0) / answered,
        "ms_ort_per_image": 1000 * delta.get("urd_inference_seconds_sum", 0.0) / answered,
        "ms_record_per_image": 1000 * delta.get("urd_record_seconds_sum", 0.0) / answered,
        "ms_request_per_image": 1000 * delta.get("urd_request_seconds_sum", 0.0) / answered,
    }


def median_row(reps: list[dict]) -> dict:
    """The median of each number over the repeats (the VM's neighbours make single runs noisy)."""
    out = dict(reps[0])
    for key, value in reps[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "concurrency":
            out[key] = float(statistics.median(r[key] for r in reps))
    out["repeats"] = len(reps)
    if "statuses" in out:
        out["statuses"] = {str(k): sum(r["statuses"].get(k, 0) for r in reps) for k in {k for r in reps for k in r["statuses"]}}
    return out


def run_profile(name: str, bundle: Path, paths: list[Path], args, tmp: Path) -> dict:
    """Bare ORT at batch 1 and 8, then the service at each concurrency, interleaved ``--repeats`` times."""
    files = [p.read_bytes() for p in paths]
    images = [read_image(p) for p in paths]
    factor = args.paper_factor if name == "paper" else 1
    seconds, warmup = args.seconds * factor, args.warmup * factor
    work = tmp / f"serve-{name}"
    work.mkdir()
    process, url = start_service(bundle, work, args.threads)
    reps: dict[str, list[dict]] = {}
    try:
        for _ in range(args.repeats if name != "paper" else 1):
            os.kill(process.pid, signal.SIGSTOP)  # the idle service keeps quiet while ORT runs alone
            try:
                for b in (1, 8):
                    row = bare_ort(bundle, images, b, seconds)
                    reps.setdefault(row["case"], []).append(row)
            finally:
                os.kill(process.pid, signal.SIGCONT)
            for c in args.concurrency:
                row = asyncio.run(load(url, process.pid, files, c, seconds, warmup))
                reps.setdefault(row["case"], []).append(row)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    rows = [median_row(r) for r in reps.values()]
    ceiling = next(r["images_per_s"] for r in rows if r["case"] == "bare ORT batch 8")
    for r in rows:
        r["of_bare_batch8"] = r["images_per_s"] / ceiling
        r["images_per_core_second"] = 1000 / r["service_cpu_ms_per_image"]  # images per CPU-second of the scoring side
    metadata = json.loads((bundle / "metadata.json").read_text())
    return {"profile": name, "backbone": metadata["architecture"].get("backbone"), "image_size": metadata["preprocessing"]["image_size"],
            "upload_shape": list(images[0].shape), "upload_bytes_mean": float(np.mean([len(f) for f in files])), "seconds": seconds,
            "rows": rows}


def show(result: dict, threads: int) -> list[str]:
    title = (f"{result['profile']}: {result['backbone']} at {result['image_size']} px, {result['upload_shape'][1]}x{result['upload_shape'][0]} "
             f"PNG uploads, {threads} ORT threads, {os.cpu_count()} cores")
    table = Table(title=title)
    columns = ("case", "images/s", "of bare b8", "p50 ms", "p99 ms", "p99/p50", "mean batch", "service CPU ms/img", "images/core-s",
               "client CPU ms/img", "prepare ms/img", "ORT ms/img", "ledger ms/img")
    for col in columns:
        table.add_column(col, justify="right")
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in result["rows"]:
        service = "mean_batch" in r
        cells = [r["case"], f"{r['images_per_s']:.1f}", f"{r['of_bare_batch8']:.0%}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                 f"{r['p99_ms'] / r['p50_ms']:.2f}", f"{r['mean_batch']:.1f}" if service else "", f"{r['service_cpu_ms_per_image']:.2f}",
                 f"{r['images_per_core_second']:.1f}"] + ([f"{r['client_cpu_ms_per_image']:.2f}", f"{r['ms_prepare_per_image']:.2f}",
                                                          f"{r['ms_ort_per_image']:.2f}", f"{r['ms_record_per_image']:.2f}"] if service else [""] * 4)
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console(width=200).print(table)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", nargs="*", default=["demo", "paper"], choices=sorted(PROFILES),
                        help="models to make and measure: demo (params.yaml) and paper (params/paper.yaml's backbone and size)")
    parser.add_argument("--bundle", type=Path, help="measure this bundle instead (exported, calibrated, with a challenge set)")
    parser.add_argument("--images", type=Path, help="images to send (default: the made demo's test images, or the bundle's challenge images)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per case")
    parser.add_argument("--paper-factor", type=float, default=3.0, help="the paper profile's cases run this many times longer (it is ~200x slower)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (the paper profile: one)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime threads, bare and in the service")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # OnnxBundle takes torch's thread count
    results, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [("given", args.bundle)] if args.bundle else [(p, None) for p in args.profile]
        for name, bundle in cases:
            if bundle is None:
                bundle = make_bundle(tmp / name, name)
                source = args.images or tmp / name / "demo" / "widget" / "test"
            else:
                source = args.images or bundle / "challenge"
            paths = expand_inputs([source])
            if not paths:
                raise SystemExit(f"no images in {source}")
            results.append(run_profile(name, bundle, paths, args, tmp))
            lines += show(results[-1], args.threads)
    record = {"machine": machine(), "command": "python -m bench.serve_load " + " ".join(sys.argv[1:]), "threads": args.threads,
              "ledger": "SQLite (WAL, synchronous=FULL) + image store on the local disk", "results": results}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "serve_load_cpu.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    head = [f"# urd serve under load ({record['machine'].get('cpu', '')}, {record['machine'].get('cpu_flags', '')})", "",
            "images/core-s: images per CPU-second of the scoring process (the service, or ORT alone). Written by "
            "`python -m bench.serve_load`.", ""]
    out.with_suffix(".md").write_text("\n".join(head + lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
