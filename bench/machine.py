"""What a benchmark ran on, recorded next to its numbers."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


# CPU features that decide which kernels (and so which precision) are fast on this host.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def machine() -> dict[str, object]:
    cpu, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu == platform.processor():
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    versions = {}
    for name in ("onnxruntime", "prefect", "mlflow", "dvc"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            continue
    return {
        "cpu": cpu,
        "cpu_flags": " ".join(f for f in FLAGS if f in flags) or "none of " + " ".join(FLAGS),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "platform": platform.platform(),
        "git_commit": commit,
    }
