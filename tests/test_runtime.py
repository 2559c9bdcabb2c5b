"""Thread budget (urd/runtime.py) and plain progress lines off a terminal (urd/progress.py)."""

import io
import os
import subprocess
import sys

import pytest
import torch

from urd import runtime
from urd.config import parse_params
from urd.progress import Progress
from urd.runtime import ThreadBudget, cgroup_cpu_limit, explicit_threads


def test_cgroup_quota_v2_and_v1(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path, proc) == 1.5
    (tmp_path / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path, proc) is None
    proc.write_text("4:memory:/x\n1:cpu,cpuacct:/job\n")
    (tmp_path / "cpu" / "job").mkdir(parents=True)
    (tmp_path / "cpu" / "job" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path, proc) == 3.0
    (tmp_path / "cpu" / "job" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path, proc) is None


def test_usable_cores_take_the_quota_below_the_affinity(monkeypatch):
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 1.5)
    assert runtime.usable_cores() == 1
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    assert runtime.usable_cores() == len(os.sched_getaffinity(0))


def test_explicit_threads_from_params_or_environment(monkeypatch):
    monkeypatch.delenv("URD_THREADS", raising=False)
    assert explicit_threads("auto") is None and explicit_threads(3) == 3
    monkeypatch.setenv("URD_THREADS", "5")
    assert explicit_threads("auto") == 5 and explicit_threads(2) == 2  # train.threads wins
    monkeypatch.setenv("URD_THREADS", "many")
    with pytest.raises(ValueError, match="URD_THREADS='many'"):
        explicit_threads("auto")
    with pytest.raises(Exception, match="train.threads"):
        parse_params({"train": {"threads": 0}})


def test_jobs_on_one_host_share_the_cores_and_give_them_back(tmp_path, monkeypatch):
    monkeypatch.delenv("URD_THREADS", raising=False)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{dead.pid}-1").write_text(str(dead.pid))  # a job that died without cleaning up
    with ThreadBudget(folder=tmp_path) as first:
        assert first.current == 4 and torch.get_num_threads() == 4
        assert not (tmp_path / f"{dead.pid}-1").exists()
        with ThreadBudget(folder=tmp_path) as nested:  # the same process counts once
            assert nested.current == 4
        other = subprocess.Popen(["sleep", "60"])  # another urd job starts beside this one
        try:
            (tmp_path / f"{other.pid}-1").write_text(str(other.pid))
            assert first.refresh() == 4  # re-read at most every interval_s
            assert first.refresh(force=True) == 2 and torch.get_num_threads() == 2
        finally:
            other.kill()
            other.wait()
        assert first.refresh(force=True) == 4 and not (tmp_path / f"{other.pid}-1").exists()
        assert first.record() == {"threads": 4, "threads_min": 2, "threads_max": 4,
                                  "threads_source": "auto: 4 usable core(s) shared by up to 2 urd job(s) on this host"}
    assert list(tmp_path.iterdir()) == []
    with ThreadBudget(3, folder=tmp_path) as fixed:  # explicit: no share taken, never changed
        assert fixed.current == 3 and list(tmp_path.iterdir()) == [] and fixed.record()["threads_source"].startswith("explicit")


def test_training_records_its_threads(tmp_path, monkeypatch):
    from urd.data.demo import DemoSpec, generate_demo
    from urd.data.manifest import build_manifest
    from urd.train import train_category

    monkeypatch.setenv("URD_THREADS", "1")
    root = tmp_path / "demo"
    generate_demo(root, DemoSpec(size=64, train=8, test_good=2, test_per_defect=1))
    params = parse_params({"dataset": {"root": str(root), "image_size": 64}, "train": {"iterations": 2, "batch_size": 2, "num_workers": 0}})
    summary = train_category(params, "widget", build_manifest("demo", root, "widget", 0.25, progress=False), tmp_path / "m", progress=False)
    assert summary["threads"] == summary["threads_min"] == 1 and summary["threads_source"].startswith("explicit")
    # a changed thread count is not a changed training: same fingerprint, same DVC stage params
    assert params.fingerprint() == params.model_copy(update={"train": params.train.model_copy(update={"threads": 7})}).fingerprint()


def test_progress_off_a_terminal_prints_plain_lines_with_rate_and_eta():
    out = io.StringIO()
    with Progress(10, "train widget", initial=2, stream=out, every_s=0) as bar:
        for _ in range(3):
            bar.update(1, {"student": 0.25})
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # one per update (every_s=0) and one at the end
    assert lines[-1].startswith("train widget: 5/10 it (50%), ") and "it/s" in lines[-1] and "ETA " in lines[-1] and "student=0.2500" in lines[-1]
    quiet = io.StringIO()
    with Progress(10, "x", stream=quiet, every_s=3600) as bar:
        bar.update(1)
    assert quiet.getvalue().count("\n") == 1  # only the closing line
    silent = io.StringIO()
    with Progress(10, "x", stream=silent, enabled=False) as bar:
        bar.update(1)
    assert silent.getvalue() == ""


def test_precision_auto_is_bf16_only_where_the_hardware_runs_it(monkeypatch):
    import torch

    import urd.runtime as runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})  # the EPYC that emulated bf16 at 0.07x fp32
    assert runtime.resolve_precision("auto", cpu) == "fp32" and runtime.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert runtime.resolve_precision("auto", cpu) == "bf16" and runtime.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert isinstance(runtime.autocast_for(cpu, "auto")(), torch.autocast)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set())
    assert not isinstance(runtime.autocast_for(cpu, "auto")(), torch.autocast)


def test_num_workers_auto_leaves_small_machines_the_cores(monkeypatch):
    import urd.runtime as runtime
    from urd.config import parse_params

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.resolve_num_workers("auto") == 0  # 2 cores: the loop was fastest without workers
    monkeypatch.setattr(runtime, "usable_cores", lambda: 16)
    assert runtime.resolve_num_workers("auto") == 4 and runtime.resolve_num_workers(1) == 1
    assert parse_params({}).train.num_workers == "auto" and parse_params({"train": {"num_workers": 3}}).train.num_workers == 3
    for bad in (-1, "many"):
        with pytest.raises(ValueError, match="num_workers"):
            parse_params({"train": {"num_workers": bad}})
