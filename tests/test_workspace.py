"""The orchestrating checkout (pipeline/workspace.py) on real git + DVC repositories: waiting for a
busy checkout, what can reach a fan-out worker, the all-or-nothing merge, leftover MLflow runs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.process import StageFailed
from pipeline.workspace import changed_categories, dvc, merge_category, read_lock, travel_problems

DVC = [sys.executable, "-m", "dvc"]


def _sh(cwd: Path, *cmd: str) -> str:
    result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _git(cwd: Path, *args: str) -> str:
    return _sh(cwd, "git", "-c", "user.email=ci@urd", "-c", "user.name=ci", *args)


def _repo(tmp_path: Path) -> Path:
    """Three categories whose data is versioned three ways: a/ nowhere, b/ with `dvc add`, c/ with
    `dvc add` and edited since; code in git."""
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    _sh(root, *DVC, "init", "-q")
    _sh(root, *DVC, "config", "core.analytics", "false")
    (root / "code.py").write_text("x = 1\n")
    for c in "abc":
        (root / "raw" / c).mkdir(parents=True)
        (root / "raw" / c / "1.txt").write_text(f"{c}1\n")
    stages = {"ingest": {"foreach": ["a", "b", "c"], "do": {"cmd": "cat raw/${item}/*.txt code.py > out/${item}.txt",
                                                             "deps": ["raw/${item}", "code.py"], "outs": ["out/${item}.txt"]}}}
    (root / "out").mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    _sh(root, *DVC, "add", "-q", "raw/b", "raw/c")
    (root / ".gitignore").write_text("/raw/a\n/out/\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    (root / "raw" / "c" / "2.txt").write_text("new image\n")  # not yet versioned
    return root


def test_what_cannot_reach_a_worker_is_named_with_its_fix(tmp_path):
    root = _repo(tmp_path)
    problems = travel_problems(root, ["a", "b", "c"])
    assert set(problems) == {"a", "c"}, problems  # b's data is versioned, committed and unchanged
    assert any("raw/a is in neither git nor DVC" in p and "dvc add raw/a" in p for p in problems["a"])
    assert any("raw/c changed since it was last versioned (raw/c.dvc)" in p and "dvc add raw/c" in p for p in problems["c"])
    (root / "code.py").write_text("x = 2\n")  # uncommitted code reaches no worker either
    assert any("code.py: uncommitted" in p for p in travel_problems(root, ["b"])["b"])
    _sh(root, *DVC, "add", "-q", "raw/c")
    _git(root, "commit", "-qam", "versioned")
    assert "c" not in travel_problems(root, ["c"])


def test_every_dvc_call_waits_for_a_busy_checkout(tmp_path):
    root = _repo(tmp_path)
    (root / "slow.yaml").write_text("")
    stages = yaml.safe_load((root / "dvc.yaml").read_text())
    stages["stages"]["slow"] = {"cmd": "sleep 6 && echo done > out/slow.txt", "outs": ["out/slow.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages))
    holder = subprocess.Popen([*DVC, "repro", "slow"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.5)  # the repro holds the checkout's lock now
        seen: list[str] = []
        changed = changed_categories(root, ["a", "b", "c"], lock_wait_s=60, log=seen.append)
        assert any("is busy" in line and "waiting" in line for line in seen), seen
        assert set(changed) == {"a", "b", "c"}
        assert holder.wait(30) == 0
        with pytest.raises(StageFailed, match="stayed locked") as held:
            holder = subprocess.Popen([*DVC, "repro", "-f", "slow"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2.5)
            dvc(root, "status", log=lambda line: None, lock_wait_s=1, poll_s=1)
        assert held.value.transient
    finally:
        holder.wait(30)


def test_a_merge_that_cannot_fetch_leaves_dvc_lock_as_it_was(tmp_path):
    root = _repo(tmp_path)
    _sh(root, *DVC, "repro", "-q")
    before = (root / "dvc.lock").read_text()
    entry = json.loads(json.dumps(read_lock(root)["stages"]["ingest@a"]))
    entry["outs"][0]["md5"] = "0" * 32  # a child's output that never reached the remote
    called = []
    with pytest.raises(StageFailed, match="dvc.lock was restored"):
        merge_category(root, "a", {"ingest@a": entry}, log=lambda line: None, lock_wait_s=5, before_checkout=lambda: called.append(1))
    assert (root / "dvc.lock").read_text() == before


def test_a_leftover_running_mlflow_run_is_ended_as_killed(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import end_leftover_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = MlflowClient().create_run(MlflowClient().create_experiment("x", artifact_location=(tmp_path / "a").as_uri()))
    run_file = tmp_path / "mlflow_run.json"
    run_file.write_text(json.dumps({"run_id": run.info.run_id}))
    assert end_leftover_run(run_file, "the train stage started over") == run.info.run_id
    ended = MlflowClient().get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and "started over" in ended.data.tags["urd.ended"]
    assert end_leftover_run(run_file, "again") is None  # a finished run is left alone
    assert end_leftover_run(tmp_path / "missing.json", "none") is None
