"""Where and how the math runs: device, precision (bf16 autocast where the hardware computes it),
data-loader workers, and the CPU threads a process may use, shared fairly among the urd jobs
running on one host.

A torch process starts as many OpenMP threads as the machine has cores. Two such processes on a
2-core host (two trainings, the inspection service beside a retrain, a test run beside a build)
spin against each other, and a demo training iteration went from 0.2 s to 4-8 s; with one thread
each, both ran at full speed. So every urd job asks :class:`ThreadBudget` how many threads it may
use, and the answer is, in this order:

1. an explicit number: ``train.threads`` (an int) or the environment variable ``URD_THREADS``;
2. otherwise the cores this process may really use (its CPU affinity, capped by a cgroup CPU quota)
   divided by the number of urd jobs that hold a share of this host right now.

Shares are files in a folder (``URD_CPU_REGISTRY``, default ``<tmp>/urd-cpu-<uid>``), one per live
job, named by its pid; a file whose process has died is ignored and removed. A long job
re-reads the budget as it goes (:meth:`ThreadBudget.refresh`), so a training that started alone
gives up half its threads when a second one starts beside it, and takes them back when it ends.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
# torch is imported where it is used: stages that never compute (ingest, validate) stay light.

THREADS_ENV = "URD_THREADS"
REGISTRY_ENV = "URD_CPU_REGISTRY"


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """CPUs granted by this process's cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``),
    or None when there is no quota."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            for folder in (root / rel, root):
                quota = _read(folder / "cpu.max")
                if quota:
                    limit, _, period = quota.partition(" ")
                    return None if limit == "max" else int(limit) / int(period or 100000)
        elif "cpu" in controllers.split(","):  # cgroup v1
            for folder in (root / "cpu" / rel, root / "cpu", root / "cpu,cpuacct" / rel, root / "cpu,cpuacct"):
                quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                if quota and period:
                    return None if int(quota) <= 0 else int(quota) / int(period)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def usable_cores() -> int:
    """Cores this process may run on: its affinity, capped by a cgroup quota (rounded down, at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; set train.device: auto or cpu")
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: CUDA that supports it, or a CPU with
    AVX-512-BF16 or AMX. Elsewhere bf16 is emulated and far slower than fp32
    (bench/results/train_speed_cpu.json)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision -> what runs: "auto" becomes bf16 where :func:`native_bf16`, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    import torch

    if resolve_precision(precision, device) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def resolve_num_workers(num_workers: int | str) -> int:
    """train.num_workers -> loader processes: "auto" is a quarter of the usable cores. Workers
    share the cores with the math threads: on 2 cores the loop ran fastest with none, while a
    16-core GPU host gets 4 (bench/results/train_profile_cpu.md)."""
    if num_workers == "auto":
        return usable_cores() // 4
    return int(num_workers)


def explicit_threads(setting: int | str = "auto") -> int | None:
    """``train.threads`` when it is a number, else ``URD_THREADS`` when set, else None (auto)."""
    if setting != "auto":
        return int(setting)
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value or value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r} is not a thread count: set it to a whole number >= 1 (or unset it, or 'auto', to share "
                         "this host's cores among the urd jobs running on it).")
    return int(value)


def registry_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get(REGISTRY_ENV) or Path(tempfile.gettempdir()) / f"urd-cpu-{uid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()
    except OSError:
        return True


class ThreadBudget:
    """This job's share of the host's cores; use as a context manager around the work.

    ``threads`` (an int or "auto") is ``train.threads``. While entered, the job holds a share in
    the registry; :meth:`refresh` re-reads the budget (at most every ``interval_s``) and applies it
    with ``torch.set_num_threads`` when it changed."""

    def __init__(self, threads: int | str = "auto", interval_s: float = 2.0, folder: str | Path | None = None) -> None:
        self.fixed = explicit_threads(threads)
        self.interval_s = interval_s
        self.folder = Path(folder) if folder is not None else registry_dir()
        self.cores = usable_cores()
        self.file: Path | None = None
        self.current = 0
        self.seen: list[int] = []
        self.seen_jobs = 1
        self._checked = 0.0

    @property
    def source(self) -> str:
        if self.fixed is not None:
            return "explicit (train.threads or URD_THREADS)"
        return f"auto: {self.cores} usable core(s) shared by up to {max(self.seen_jobs, 1)} urd job(s) on this host"

    def __enter__(self) -> "ThreadBudget":
        if self.fixed is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file = self.folder / f"{os.getpid()}-{time.time_ns()}"
            self.file.write_text(str(os.getpid()))
        self.refresh(force=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)
            self.file = None

    def live_jobs(self) -> int:
        """Processes holding a share now (this one included; nested budgets of one process count
        once); removes the files of dead ones."""
        pids = set()
        for entry in self.folder.glob("*-*"):
            try:
                pid = int(entry.name.split("-", 1)[0])
            except ValueError:
                continue
            if _alive(pid):
                pids.add(pid)
            else:
                entry.unlink(missing_ok=True)
        return max(1, len(pids))

    def threads(self) -> int:
        if self.fixed is not None:
            return self.fixed
        jobs = self.live_jobs()
        self.seen_jobs = max(self.seen_jobs, jobs)
        return max(1, self.cores // jobs)

    def refresh(self, force: bool = False) -> int:
        """Re-read the budget (every ``interval_s`` at most) and apply it; returns the thread count."""
        now = time.monotonic()
        if force or now - self._checked >= self.interval_s:
            self._checked = now
            threads = self.threads()
            if threads != self.current:
                torch = sys.modules.get("torch")
                if torch is not None:
                    torch.set_num_threads(threads)
                else:  # read by torch (and numpy's BLAS) when imported later
                    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
                self.current = threads
                self.seen.append(threads)
        return self.current

    def record(self) -> dict[str, object]:
        """What ran, for training.json / MLflow: the threads at the start, their range, and why."""
        return {"threads": self.seen[0] if self.seen else self.current, "threads_min": min(self.seen or [self.current]),
                "threads_max": max(self.seen or [self.current]), "threads_source": self.source}

