"""Clients of the inspection service: ``urd inspect`` (images or folders -> a results CSV) and
``urd watch`` (a camera's drop folder: every new file inspected once, then moved to done/ or failed/).

Both send an ``Idempotency-Key`` (category, file name and content hash), so a retry after a lost
answer or a restart of the watcher never makes a second record: the service answers with the
record it already has.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import pandas as pd

from ..data.layouts import IMAGE_SUFFIXES

COLUMNS = ["path", "id", "decision", "score", "normalized_score", "model_version", "threshold_version", "error"]


def token_from_env(token: str | None) -> str:
    token = token or os.environ.get("URD_TOKEN")
    if not token:
        raise ValueError("no token: pass --token or set URD_TOKEN to a line token of the service (its serve.tokens file holds them)")
    return token


@dataclass
class InspectClient:
    server: str
    category: str
    token: str
    line: str | None = None
    camera: str | None = None
    timeout: float = 30.0
    retries: int = 5

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.server.rstrip("/"), timeout=self.timeout, headers={"Authorization": f"Bearer {self.token}"})

    def close(self) -> None:
        self.http.close()

    def inspect(self, path: Path) -> dict[str, Any]:
        """One file -> the service's record (or ``{"error": ...}``); retries on 503 and connection errors."""
        data = path.read_bytes()
        key = f"{self.category}:{path.name}:{hashlib.sha256(data).hexdigest()}"
        params = {k: v for k, v in {"line": self.line, "camera": self.camera, "part_id": path.stem}.items() if v}
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                response = self.http.post(f"/v1/inspect/{self.category}", content=data, params=params,
                                          headers={"Idempotency-Key": key, "Content-Type": "application/octet-stream"})
            except httpx.TransportError as exc:
                error = f"cannot reach {self.server}: {exc}"
            else:
                if response.status_code == 200:
                    return response.json()
                detail = response.json().get("detail", response.text) if response.headers.get("content-type", "").startswith("application/json") else response.text
                error = f"HTTP {response.status_code}: {detail}"
                if response.status_code != 503:
                    return {"error": error, "status": response.status_code}
                delay = float(response.headers.get("retry-after", delay))
            if attempt < self.retries:
                time.sleep(delay)
                delay = min(delay * 2, 10)
        return {"error": error, "status": 503}


def row_of(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    return {"path": str(path), "id": record.get("id", ""), "decision": record.get("decision", ""), "score": record.get("score"),
            "normalized_score": record.get("normalized_score"), "model_version": (record.get("model") or {}).get("version", ""),
            "threshold_version": record.get("threshold_version"), "error": record.get("error", "")}


def inspect_files(client: InspectClient, paths: list[Path], out_csv: Path, on_result: Callable[[Path, dict], None] | None = None) -> pd.DataFrame:
    rows = []
    for path in paths:
        record = client.inspect(path)
        rows.append(row_of(path, record))
        if on_result:
            on_result(path, record)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False)
    return frame


def _unique(target: Path) -> Path:
    if not target.exists():
        return target
    for i in range(1, 10_000):
        candidate = target.with_name(f"{target.stem}_{i}{target.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(target)


def watch_once(client: InspectClient, folder: Path, settle_seconds: float = 1.0) -> int:
    """Inspect every image file in ``folder`` (not in done/ or failed/) that has not changed for
    ``settle_seconds`` (a camera may still be writing it); move it with a ``.json`` of the answer
    beside it to done/ (recorded) or failed/ (refused). Returns how many files were handled."""
    done, failed = folder / "done", folder / "failed"
    done.mkdir(exist_ok=True)
    failed.mkdir(exist_ok=True)
    handled = 0
    now = time.time()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")):
        if now - path.stat().st_mtime < settle_seconds:
            continue
        record = client.inspect(path)
        if record.get("status") == 503 or (record.get("error") and "cannot reach" in record["error"]):
            break  # the service is down or full: leave the file for the next pass
        target = _unique((failed if record.get("error") else done) / path.name)
        target.with_suffix(target.suffix + ".json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.move(str(path), target)
        handled += 1
    return handled


def watch(client: InspectClient, folder: Path, interval: float = 1.0, settle_seconds: float = 1.0, stop: Callable[[], bool] = lambda: False,
          log: Callable[[str], None] = print) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; create it or point the camera's drop folder there")
    total = 0
    while not stop():
        handled = watch_once(client, folder, settle_seconds)
        if handled:
            total += handled
            log(f"{handled} files inspected ({total} since start)")
        time.sleep(interval)
