"""The models a service serves: one ONNX Runtime session per category, from the MLflow registry
alias (``production`` by default) or from a bundle folder per category, each proven by its
challenge set before it serves a single part, swapped in without a restart when the alias moves.

A request takes the category's :class:`ServedModel` when it arrives and is scored and recorded
with that one, so a swap never changes the model under a request in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibrate import decide, normalize_scores, review_threshold
from ..challenge import ChallengeResult, check_challenge_set
from ..data.images import resize_image
from ..data.torch_data import to_unit
from ..files import CHALLENGE_FILE, INT8_ONNX_FILE, METADATA_FILE, ONNX_FILE, registered_name
from ..inference import OnnxBundle
from .ledger import Ledger
from .uploads import decode_upload

log = logging.getLogger("urd.serve")


_DIGESTS: dict[tuple, str] = {}


def bundle_digest(bundle_dir: str | Path) -> str:
    """sha256 over what decides: the graphs, the metadata (thresholds) and the challenge set.
    Remembered per file signature (path, size, mtime, inode): the service asks on every poll, and
    hashing a 600 MB graph each time would cost seconds of CPU; a replaced or rewritten file has a
    new signature and is hashed again."""
    files = [(name, Path(bundle_dir) / name) for name in (METADATA_FILE, ONNX_FILE, INT8_ONNX_FILE, CHALLENGE_FILE)]
    files = [(name, file, file.stat()) for name, file in files if file.is_file()]
    key = tuple((str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino) for _, file, st in files)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        for name, file, _ in files:
            digest.update(name.encode() + b"\0")
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


@dataclass(frozen=True)
class Thresholds:
    """The decision rule in force for a category: a threshold version of the ledger."""

    version: int
    review: float
    reject: float
    low: float  # image_min of the calibration (normalisation)
    high: float  # image_max

    def decide(self, score: float) -> tuple[float, str]:
        return float(normalize_scores(score, self.reject, self.low, self.high)), decide(score, self.review, self.reject)


@dataclass
class ServedModel:
    category: str
    name: str  # the registered model, or bundle:<folder>
    version: str  # the registry version, or "local"
    alias: str | None
    bundle_dir: Path
    digest: str
    metadata: dict[str, Any]
    runner: OnnxBundle
    challenge: ChallengeResult = field(default_factory=lambda: ChallengeResult(False))

    @property
    def image_size(self) -> int:
        return int(self.metadata["preprocessing"]["image_size"])

    @property
    def calibration(self) -> dict[str, Any]:
        return self.metadata["thresholds"]

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 RGB -> 3 x S x S float32 in [0, 1], exactly as ``urd predict`` prepares it."""
        return to_unit(torch.from_numpy(resize_image(image, self.image_size)).permute(2, 0, 1)).numpy()

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N x 3 x S x S -> anomaly maps (N x S x S), image scores (N)."""
        maps, scores = self.runner(batch)
        return maps[:, 0], scores

    def check_challenge(self, max_pixels: int = 1 << 30) -> ChallengeResult:
        """Score the bundle's challenge set through the very path uploads take (decoding included)."""

        def score(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            return self.score(images.numpy())

        fmt = "onnx_int8" if self.runner.precision == "int8" else "onnx"
        return check_challenge_set(self.bundle_dir, score, fmt, read=lambda data, _name: decode_upload(data, len(data) + 1, max_pixels))

    def describe(self) -> dict[str, Any]:
        return {"model_name": self.name, "model_version": self.version, "alias": self.alias, "bundle_digest": self.digest,
                "precision": self.runner.precision, "challenge": {"passed": self.challenge.passed, "images": self.challenge.images,
                                                                  "max_deviation": self.challenge.max_deviation}}


def load_served_model(category: str, bundle_dir: str | Path, name: str, version: str, alias: str | None, precision: str = "fp32",
                      max_pixels: int = 1 << 30) -> ServedModel:
    """Load a bundle and run its challenge set through the very path uploads take."""
    bundle_dir = Path(bundle_dir)
    metadata = json.loads((bundle_dir / METADATA_FILE).read_text())
    if not metadata.get("thresholds"):
        raise ValueError(f"{bundle_dir}: the bundle is not calibrated (no thresholds in {METADATA_FILE}); a service needs thresholds to decide")
    if metadata.get("category") != category:
        raise ValueError(f"{bundle_dir} holds a model of category {metadata.get('category')!r}, not {category!r}")
    model = ServedModel(category, name, version, alias, bundle_dir, bundle_digest(bundle_dir), metadata,
                        OnnxBundle(bundle_dir, metadata, precision, spin=False))  # the cores are shared with decoding and HTTP
    model.challenge = model.check_challenge(max_pixels)
    return model


class BundleSource:
    """A bundle folder per category (a registry-free install); the version is the folder's digest."""

    def __init__(self, bundles: dict[str, Path]) -> None:
        self.bundles = {c: Path(p) for c, p in bundles.items()}

    def locate(self, category: str) -> tuple[str, str, str | None, Path]:
        folder = self.bundles[category]
        if not (folder / METADATA_FILE).is_file():
            raise FileNotFoundError(f"{folder / METADATA_FILE} not found: --bundle {category}={folder} is not an exported bundle "
                                    "(`urd export` or the package stage writes one)")
        return f"bundle:{folder}", "local", None, folder


class RegistrySource:
    """The version an MLflow registry alias points at, downloaded once into ``cache``."""

    def __init__(self, dataset: str, alias: str, cache: Path) -> None:
        self.dataset, self.alias, self.cache = dataset, alias, Path(cache)

    def locate(self, category: str) -> tuple[str, str, str | None, Path]:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        name = registered_name(self.dataset, category)
        try:
            version = str(MlflowClient().get_model_version_by_alias(name, self.alias).version)
        except MlflowException as exc:
            raise LookupError(f"{name} has no version with the alias {self.alias!r} in the registry at {mlflow.get_tracking_uri()} "
                              f"(promote one with `python -m pipeline promote`, or serve --alias candidate for a trial)") from exc
        return name, version, self.alias, download_version(name, version, self.cache)


def download_version(name: str, version: str, cache: Path) -> Path:
    """The bundle folder of a registered version, downloaded once into ``cache/<name>/<version>``."""
    import os

    import mlflow

    target = Path(cache) / name / version
    if not (target / ".complete").is_file():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        target.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(target))
        (target / ".complete").touch()
    return next(target.rglob(METADATA_FILE)).parent


class ModelBook:
    """The model and the thresholds each category is served with, and why a newer one is not."""

    def __init__(self, categories: list[str], source, ledger: Ledger, precision: str = "fp32", max_pixels: int = 1 << 30) -> None:
        self.categories = list(categories)
        self.source = source
        self.ledger = ledger
        self.precision = precision
        self.max_pixels = max_pixels
        self.models: dict[str, ServedModel] = {}
        self.thresholds: dict[str, Thresholds] = {}
        self.problems: dict[str, str] = {}  # category -> why it is not ready / not on the newest version
        self.refused: dict[str, tuple[str, str, str]] = {}  # category -> (name, version, digest) last refused
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return all(c in self.models for c in self.categories)

    def refresh(self, category: str, force: bool = False) -> str:
        """Look up the category's newest model; load, check and switch to it if it is new. Returns
        what happened (serving, unchanged, refused, unavailable), each recorded where it matters.
        A version once refused is not checked again on every poll, only when ``force`` (an admin's
        reload) asks for it."""
        try:
            name, version, alias, folder = self.source.locate(category)
        except (LookupError, FileNotFoundError, OSError) as exc:
            self.problems[category] = str(exc)
            log.error("%s: %s", category, exc)
            return "unavailable"
        current = self.models.get(category)
        digest = bundle_digest(folder)
        if current is not None and current.version == version and current.name == name and current.digest == digest:
            self.problems.pop(category, None)  # e.g. a rollback to the version served after a refusal
            self.refused.pop(category, None)
            self.reload_thresholds(category)
            return "unchanged"
        if not force and self.refused.get(category) == (name, version, digest):
            return "refused"
        try:
            candidate = load_served_model(category, folder, name, version, alias, self.precision, self.max_pixels)
        except (ValueError, OSError) as exc:
            self.problems[category] = f"{name} version {version} cannot be loaded: {exc}"
            log.error("%s: %s", category, self.problems[category])
            return "unavailable"
        if not candidate.challenge.passed:
            why = (f"{name} version {version} failed its challenge set ({candidate.challenge.reason}); "
                   + (f"still serving version {current.version}" if current else "nothing served for this category"))
            self.problems[category] = why
            self.refused[category] = (name, version, candidate.digest)
            log.error("%s: %s", category, why)
            self.ledger.add_model_event(category, "refused", name, version, candidate.digest,
                                        {"reason": why, "problems": candidate.challenge.problems,
                                         "serving": current.version if current else None})
            return "refused"
        with self._lock:
            self.models[category] = candidate
            self.problems.pop(category, None)
            self.refused.pop(category, None)
        self.reload_thresholds(category)
        self.ledger.add_model_event(category, "serving", name, version, candidate.digest,
                                    {"replaces": current.version if current else None, "challenge_images": candidate.challenge.images,
                                     "max_deviation": candidate.challenge.max_deviation, "precision": self.precision})
        log.info("%s: serving %s version %s (challenge set passed, %d images, max deviation %.2e)", category, name, version,
                 candidate.challenge.images, candidate.challenge.max_deviation)
        return "serving"

    def reload_thresholds(self, category: str) -> Thresholds:
        """The newest threshold version of the served bundle; the bundle's calibration is version one."""
        model = self.models[category]
        c = model.calibration
        row = self.ledger.latest_threshold(category, model.digest)
        if row is None:
            row = self.ledger.add_threshold_version(category, model.digest, review_threshold(c), float(c["image_threshold"]), "calibration",
                                                    "bundle", note=f"{model.name} version {model.version}")
        thresholds = Thresholds(row.id, row.review_threshold, row.image_threshold, float(c["image_min"]), float(c["image_max"]))
        self.thresholds[category] = thresholds
        return thresholds

    def set_thresholds(self, category: str, review: float, reject: float, set_by: str, note: str | None = None) -> Thresholds:
        if not review <= reject:
            raise ValueError(f"the review threshold ({review}) must not be above the reject threshold ({reject})")
        model = self.models[category]
        self.ledger.add_threshold_version(category, model.digest, review, reject, "admin", set_by, note)
        return self.reload_thresholds(category)
