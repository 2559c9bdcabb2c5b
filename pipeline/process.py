"""Commands a flow runs: in their own process group, output streamed line by line to a log,
killed with everything they started at a timeout, failures summarised and classed as transient
(worth a retry) or not."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable

# Output of a failed command that says "try again later", not "this will fail again": another
# DVC process holds the lock, the MLflow server or a remote is briefly unreachable, SQLite busy.
TRANSIENT = re.compile(
    r"Unable to acquire lock|is locked by|is busy|database is locked|Connection refused|ConnectionError|Max retries exceeded|"
    r"Temporary failure in name resolution|Service Unavailable|\b50[234]\b|Read timed out|RemoteDisconnected",
    re.IGNORECASE,
)


class StageFailed(RuntimeError):
    """A command failed; ``transient`` says whether running it again may help."""

    def __init__(self, message: str, transient: bool = False, output: str = "") -> None:
        super().__init__(message)
        self.transient = transient
        self.output = output


def run_logged(cmd: list[str], cwd: str | Path, timeout_s: float | None = None, env: dict[str, str] | None = None,
               log: Callable[[str], None] = print) -> str:
    """Run ``cmd`` in its own process group, each output line to ``log``; returns the output.

    At ``timeout_s`` the whole group (DVC and the stage it started) gets SIGTERM, then SIGKILL
    after 10 s: a timeout that only stopped waiting would leave training running behind it.
    Raises StageFailed (``transient`` when the output looks like a lock or network hiccup)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(5)
        raise StageFailed(f"`{' '.join(cmd)}` ran past its timeout of {timeout_s:.0f} s (retrain.stage_timeout_minutes) and was killed "
                          "with its process group") from None
    reader.join(30)
    output = "".join(lines)
    if proc.returncode != 0:
        raise StageFailed(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {failure_summary(output)}", transient=bool(TRANSIENT.search(output)),
                          output=output)
    return output


def failure_summary(output: str) -> str:
    """The lines of a failed run a person needs: the stage's own error paragraph (`error in ...`
    and its indented details) and DVC's verdict; else the last lines."""
    lines = output.strip().splitlines()
    keep, inside = [], False
    for line in lines:
        if line.startswith("error in "):
            inside = True
        elif inside and not line.startswith(("  ", "Nothing downstream")):
            inside = False
        if inside or line.startswith("ERROR:"):
            keep.append(line.strip())
    return " ".join(keep[:12]) if keep else " ".join(line.strip() for line in lines[-5:])


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
