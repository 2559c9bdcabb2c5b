"""Progress of long work, shown where its user looks.

On a terminal: a tqdm bar. Anywhere else (a DVC stage run by a Prefect flow, a CI log, a file) a
bar's carriage-return redraws either pile up into one line that arrives at the end or flood the
log ten times a second; there, :class:`Progress` prints one plain line every ``every_s`` seconds
(and at the end) with the count, rate, ETA and the latest values, so an operator reading the
run's log can tell a working job from a hung one.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO

from tqdm import tqdm

LOG_EVERY_S = 15.0  # off a terminal: seconds between lines (URD_PROGRESS_SECONDS overrides)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``update(n, values)`` after each step, ``close()`` at the end (or use it as a context)."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it", enabled: bool = True,
                 every_s: float | None = None, stream: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s = every_s if every_s is not None else float(os.environ.get("URD_PROGRESS_SECONDS") or LOG_EVERY_S)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)
        self.start_count = self.count = initial
        self.started = self.last_line = time.monotonic()
        self.values: dict[str, float] = {}
        self.closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, values: dict[str, float] | None = None) -> None:
        self.count += n
        if values:
            self.values = values
        if self.bar is not None:
            self.bar.update(n)
            if values:
                self.bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)
        elif self.enabled and time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.count - self.start_count
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - self.count) / rate) if rate > 0 else "?"
        values = " ".join(f"{k}={v:.4f}" for k, v in self.values.items())
        return (f"{self.desc}: {self.count}/{self.total} {self.unit} ({100 * self.count / max(self.total, 1):.0f}%), "
                f"{rate:.2f} {self.unit}/s, elapsed {_duration(elapsed)}, ETA {eta}" + (f", {values}" if values else ""))

    def _line(self) -> None:
        self.last_line = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and not self.closed:
            self._line()
        self.closed = True
