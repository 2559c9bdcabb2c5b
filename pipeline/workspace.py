"""The checkout a flow works in: DVC and git calls that wait for a busy checkout, what changed,
what of it can reach a worker on another host, and merging a worker's results back.

* :func:`dvc` runs a DVC command and, while another DVC process holds this checkout's lock,
  waits and tries again (up to ``retrain.lock_wait_minutes``), saying so in the log.
* :func:`changed_stages` / :func:`changed_categories`: ``dvc status`` per stage and category.
* :func:`travel_problems`: fan-out children clone the git commit and pull the DVC remote, so a
  category can be built elsewhere only when every input of its stages is in git (committed) or
  in DVC (a ``.dvc`` pointer in sync and committed, or a cached output of a stage the parent
  runs itself). Anything else is named with its fix.
* :func:`merge_category`: a child's ``dvc.lock`` entries and outputs into this checkout, all or
  nothing: the outputs are fetched into the cache first, and ``dvc.lock`` is restored if the
  checkout fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from urd.files import atomic_write_text

from .layout import GLOBAL_STAGES
from .process import StageFailed, run_logged

# DVC's advice to a person at a terminal (git add dvc.lock, autostage, dvc push): not for a flow's log.
DVC_HINTS = re.compile(r"^\s*(To track the changes with git|git add |To enable auto staging|dvc config core\.autostage|Use `dvc push`)")
LOCK_HELD = re.compile(r"Unable to acquire lock|is locked by|is busy|lock is held|Lock file .* exists", re.IGNORECASE)


def stage_env() -> dict[str, str]:
    """Stage commands call `python -m pipeline`: this interpreter's, first on PATH."""
    return os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def dvc(root: str | Path, *args: str, log: Callable[[str], None] = print, timeout_s: float | None = None, env: dict[str, str] | None = None,
        lock_wait_s: float = 1800.0, poll_s: float = 10.0) -> str:
    """``dvc <args>`` in ``root``; while the checkout is locked by another DVC process, wait
    ``poll_s`` and try again, up to ``lock_wait_s`` in all (then StageFailed, transient)."""
    waited = 0.0

    def shown(line: str) -> None:
        if not DVC_HINTS.match(line):
            log(line)

    while True:
        try:
            return run_logged([sys.executable, "-m", "dvc", *args], root, timeout_s, env=env or stage_env(), log=shown)
        except StageFailed as exc:
            if not LOCK_HELD.search(str(exc) + exc.output):
                raise
            if waited >= lock_wait_s:
                raise StageFailed(f"`dvc {' '.join(args)}`: the checkout {root} stayed locked by another DVC process for {waited:.0f} s "
                                  "(retrain.lock_wait_minutes). Wait for it, or if no dvc process is running any more, "
                                  "remove .dvc/tmp/lock and .dvc/tmp/rwlock.", transient=True, output=exc.output) from None
            log(f"the checkout {root} is busy (another dvc process holds its lock): waiting {poll_s:.0f} s and trying "
                   f"`dvc {args[0]}` again ({waited:.0f} of {lock_wait_s:.0f} s waited)")
            time.sleep(poll_s)
            waited += poll_s


def git(root: str | Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise StageFailed(f"`git {' '.join(args)}` failed in {root}: {result.stderr.strip()}")
    return result.stdout.rstrip()  # not strip(): porcelain lines start with a space


def stage_category(stage: str) -> str | None:
    """'train@widget' -> 'widget'; global stages -> None."""
    return stage.split("@", 1)[1] if "@" in stage else None


def changed_stages(root: str | Path, lock_wait_s: float = 1800.0, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """{stage: the paths `dvc status` reports changed in it} (empty list: changed for another reason)."""
    def keep(line: str) -> None:
        if not line.lstrip().startswith(("{", "[")):
            log(line)

    output = dvc(root, "status", "--json", log=keep, lock_wait_s=lock_wait_s)
    lines = [line for line in output.strip().splitlines() if line.strip().startswith("{")]
    status = json.loads(lines[-1]) if lines else {}
    changed: dict[str, list[str]] = {}
    for stage, entries in status.items():
        paths: list[str] = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                for value in entry.values():
                    if isinstance(value, dict):
                        paths += list(value)
        changed[stage] = paths
    return changed


def changed_categories(root: str | Path, categories: list[str], lock_wait_s: float = 1800.0, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """{category: its stages `dvc status` reports as changed}; a changed global stage (demo data,
    textures) puts every category in."""
    status = changed_stages(root, lock_wait_s, log)
    global_changed = [s for s in status if stage_category(s) is None and s.split(":")[-1] in GLOBAL_STAGES]
    changed: dict[str, list[str]] = {}
    for category in categories:
        own = [s for s in status if stage_category(s) == category]
        if own or global_changed:
            changed[category] = global_changed + own
    return changed


# ---------------------------------------------------------------- what can reach a worker


def _inside(path: str, folder: str) -> bool:
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def travel_problems(root: str | Path, categories: list[str]) -> dict[str, list[str]]:
    """{category: what of its stages' inputs cannot reach a fan-out child, each with the fix}.

    Every dependency of the category's stages must be (a) an output of another stage (rebuilt or
    pulled), (b) a git-tracked path with no uncommitted change (children check out the commit),
    (c) inside a cached output of a stage the parent runs and pushes itself (the generated demo), or
    (d) inside a folder versioned with `dvc add` whose pointer matches the data and is committed
    (the parent pushes it). Untracked files under a git-tracked folder do not travel either."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    repo = Repo(str(root))
    try:
        stages = list(repo.index.stages)
    finally:
        repo.close()
    def rel(item) -> str:  # a .dvc file's paths are relative to its folder: make every path relative to the root
        return os.path.relpath(item.fs_path, root)

    produced = {rel(out): stage for stage in stages for out in stage.outs}
    tracked = set(git(root, "ls-files").splitlines())
    dirty = {line[3:].strip().strip('"') for line in git(root, "status", "--porcelain", "--untracked-files=all").splitlines()}
    problems: dict[str, list[str]] = {}
    for category in categories:
        found: list[str] = []
        for stage in (s for s in stages if stage_category(s.addressing) == category):
            for dep in stage.deps:
                path = rel(dep)
                owner = next((s for out, s in produced.items() if _inside(path, out) and s is not stage), None)
                if owner is not None and owner.addressing.endswith(".dvc"):
                    problem = _pointer_problem(root, os.path.relpath(owner.path, root), tracked, dirty)
                    if problem:
                        found.append(problem)
                    continue
                if owner is not None:
                    out = next(o for o in owner.outs if _inside(path, rel(o)))
                    if stage_category(owner.addressing) is None and owner.addressing not in GLOBAL_STAGES:
                        found.append(f"{path} is an output of the stage {owner.addressing}, which neither the parent runs nor the child: "
                                     "run it with `dvc repro` and push before fanning out")
                    elif owner.addressing in GLOBAL_STAGES and not out.use_cache:
                        found.append(f"{path} is an output of {owner.addressing} kept out of the DVC cache (cache: false), so the DVC remote "
                                     "cannot carry it: set `cache: true` on it in dvc.yaml and commit")
                    continue
                in_git = path in tracked or any(_inside(t, path) for t in tracked)
                if in_git:
                    changes = sorted(d for d in dirty if _inside(d, path))
                    if changes:
                        found.append(f"{', '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}: uncommitted (children check out the "
                                     f"commit); commit them: git add {' '.join(changes[:5])} && git commit")
                    continue
                found.append(f"{path} is in neither git nor DVC, so a worker on another host cannot get it: version it with "
                             f"`dvc add {path}` (or the dataset root above it), `git add {path}.dvc` and `git commit`; the flow pushes it")
        if found:
            problems[category] = sorted(set(found))
    return problems


def _pointer_problem(root: Path, pointer: str, tracked: set[str], dirty: set[str]) -> str | None:
    data = pointer.removesuffix(".dvc")
    if pointer not in tracked:
        return f"{pointer} (the DVC pointer of {data}) is not in git: `git add -f {pointer}` and `git commit`"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", pointer], cwd=root, capture_output=True, text=True, env=stage_env())
    lines = [line for line in status.stdout.splitlines() if line.strip().startswith("{")]
    if status.returncode == 0 and lines and json.loads(lines[-1]):
        return (f"{data} changed since it was last versioned ({pointer}): run `dvc add {data}` and `git commit {pointer}` so workers get "
                "this data (the flow pushes it)")
    if pointer in dirty:
        return f"{pointer} has uncommitted changes: `git commit {pointer}` (children check out the commit)"
    return None


def data_pointers(root: str | Path) -> list[str]:
    """The `.dvc` pointer files of this checkout (what the parent pushes before fan-out)."""
    return sorted(p for p in git(root, "ls-files").splitlines() if p.endswith(".dvc"))


# ---------------------------------------------------------------- merging a child's results


def read_lock(root: Path) -> dict[str, Any]:
    lock_file = root / "dvc.lock"
    return yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else {"schema": "2.0", "stages": {}}


def merge_category(root: Path, category: str, entries: dict[str, Any], log: Callable[[str], None], lock_wait_s: float = 1800.0,
                   before_checkout: Callable[[], None] | None = None) -> None:
    """Take a child's ``dvc.lock`` entries for ``category`` and its outputs, all or nothing.

    The merged lock is written, the outputs are fetched into the cache (nothing in the workspace
    changes), ``before_checkout`` runs (it ends the MLflow run of a leftover output), and then
    the stages' outputs are checked out with ``--force``: they are the pipeline's own outputs,
    and what is in the workspace is a stale or half-written leftover of an interrupted run. On
    any failure the previous ``dvc.lock`` is put back and StageFailed says what happened."""
    lock_file = root / "dvc.lock"
    before = lock_file.read_text() if lock_file.is_file() else None
    lock = read_lock(root)
    lock.setdefault("stages", {}).update(entries)
    atomic_write_text(lock_file, yaml.safe_dump(lock, sort_keys=False))
    try:
        dvc(root, "fetch", *entries, log=log, lock_wait_s=lock_wait_s)
        if before_checkout is not None:
            before_checkout()
        dvc(root, "checkout", "--force", *entries, log=log, lock_wait_s=lock_wait_s)
    except Exception as exc:
        if before is None:
            lock_file.unlink(missing_ok=True)
        else:
            atomic_write_text(lock_file, before)
        raise StageFailed(f"merging {category}'s results into {root} failed, so dvc.lock was restored and {category} reads as changed "
                          f"here (a rerun builds it again): {exc}", transient=getattr(exc, "transient", False)) from None


def stages_ran(output: str) -> list[str]:
    """The stages a `dvc repro` output says it ran."""
    return re.findall(r"Running stage '([^']+)'", output)
