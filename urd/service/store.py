"""The image store: every inspected image's bytes under its sha256 (``ab/cd/abcd....``), written
once, atomically; images older than the retention are deleted (their ledger records stay)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ..files import atomic_write


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_type(data: bytes) -> tuple[str, str]:
    """(media type, file suffix) of an image file's bytes, from its signature."""
    if data.startswith(b"\x89PNG"):
        return "image/png", ".png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg", ".jpg"
    if data.startswith(b"BM"):
        return "image/bmp", ".bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff", ".tif"
    return "application/octet-stream", ".bin"


class ImageStore:
    def __init__(self, root: str | Path, retention_days: float) -> None:
        self.root = Path(root)
        self.retention_seconds = retention_days * 86400
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest[2:4] / digest

    def put(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha256(data)
        target = self.path(digest)
        if target.is_file():
            os.utime(target)  # seen again: its retention starts over
        else:
            atomic_write(target, lambda tmp: tmp.write_bytes(data))
        return digest

    def get(self, digest: str) -> bytes | None:
        target = self.path(digest)
        return target.read_bytes() if target.is_file() else None

    def prune(self, now: float | None = None) -> int:
        """Delete images older than the retention; returns how many."""
        cutoff = (now or time.time()) - self.retention_seconds
        removed = 0
        for file in self.root.glob("??/??/*"):
            if file.is_file() and not file.name.startswith(".") and file.stat().st_mtime < cutoff:
                file.unlink(missing_ok=True)
                removed += 1
        return removed
