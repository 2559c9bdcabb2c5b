"""Run a trained model on new images: scores, normalised scores, decisions, maps, masks, overlays."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .calibrate import decide, normalize_scores, review_threshold
from .checkpoint import load_model
from .files import BUNDLE_FORMAT, CALIBRATION_FILE, INT8_ONNX_FILE, METADATA_FILE, ONNX_FILE
from .data.images import ImageReadError, read_image, resize_image
from .data.layouts import IMAGE_SUFFIXES
from .data.torch_data import to_unit
from .evaluate import overlay
from .scoring import score_rows, torch_scorer



@dataclass
class Prediction:
    path: str
    score: float = float("nan")
    normalized_score: float = float("nan")
    is_anomalous: bool | None = None  # decision == "reject"
    decision: str = ""  # accept | review | reject ("" uncalibrated or unreadable)
    error: str = ""
    anomaly_map: np.ndarray | None = field(default=None, repr=False)  # S x S, raw scale
    original_size: tuple[int, int] = (0, 0)  # (height, width)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for images (sorted)."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(item)
    return out


class Predictor:
    """A trained model, ready to score images. ``model_dir`` is either

    * a model folder (model.safetensors + model.json [+ calibration.json]): eager PyTorch, or
    * an exported bundle (metadata.json + model.onnx, see urd.export): ONNX Runtime, with the
      thresholds read from metadata.json (so a user's edits there take effect).

    ``precision``: for eager PyTorch ``auto`` (bf16 autocast where the device computes bf16
    natively, as in training; fp32 elsewhere), ``fp32`` or ``bf16``; for a bundle ``auto`` / ``fp32``
    (the fp32 graph) or ``int8`` (its quantised graph). The anomaly map is fp32 in every case.
    ``self.precision`` says what runs.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", precision: str = "auto") -> None:
        from .runtime import autocast_for, resolve_precision

        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.bundle: OnnxBundle | None = None
        self.autocast = contextlib.nullcontext
        metadata_file = self.model_dir / METADATA_FILE
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else None
        if metadata is not None and metadata["files"].get("onnx"):
            if precision not in ("auto", "fp32", "int8"):
                raise ValueError(f"precision {precision!r} is not available for an ONNX bundle ({self.model_dir}); use auto, fp32 or int8")
            self.precision = "int8" if precision == "int8" else "fp32"
            self.bundle = OnnxBundle(self.model_dir, metadata, precision=self.precision)
            self.scorer = self.bundle.score
            self.meta = metadata
        else:  # a model folder, or a bundle without ONNX (it holds the weights too)
            if precision not in ("auto", "fp32", "bf16"):
                raise ValueError(f"precision {precision!r} is not available for eager PyTorch ({self.model_dir}); use auto, fp32 or bf16 "
                                 "(int8 needs a bundle packaged with package.quantize: int8)")
            self.precision = resolve_precision(precision, self.device)
            self.autocast = autocast_for(self.device, self.precision)
            self.graph, self.meta = load_model(self.model_dir, self.device)
            # channels_last inside: faster on CPU at every size and batch measured (bench/results/bundle_latency_cpu.md)
            self.scorer = torch_scorer(self.graph, self.device, self.autocast)
        if metadata is not None:
            self.calibration = metadata.get("thresholds")
        else:
            calibration = self.model_dir / CALIBRATION_FILE
            self.calibration = json.loads(calibration.read_text()) if calibration.is_file() else None
        self.image_size = int(self.meta["preprocessing"]["image_size"])

    def score_tensor(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """N x 3 x S x S RGB images in [0, 1] -> anomaly maps (N x S x S) and image scores (N), raw scale."""
        return self.scorer(images)

    def score_arrays(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 images (any size) -> anomaly maps (N x S x S) and image scores (N), raw scale."""
        batch = np.stack([resize_image(image, self.image_size) for image in images])
        return self.score_tensor(to_unit(torch.from_numpy(batch).permute(0, 3, 1, 2)))

    def score_rows(self, rows: pd.DataFrame, batch_size: int = 8, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Manifest rows -> anomaly maps (N x S x S), image scores (N) and ground-truth masks
        (N x S x S bool) at this model's input size: what evaluate computes, for any model or bundle."""
        if not len(rows):
            raise ValueError("no images to score")
        return score_rows(self.scorer, rows, self.image_size, batch_size, progress)

    def decide(self, score: float) -> tuple[float, str]:
        """(normalised score, accept | review | reject) at the calibrated thresholds; (nan, "") uncalibrated."""
        if self.calibration is None:
            return float("nan"), ""
        c = self.calibration
        normalized = float(normalize_scores(score, c["image_threshold"], c["image_min"], c["image_max"]))
        return normalized, decide(score, review_threshold(c), c["image_threshold"])

    def predict(self, paths: list[str | Path], batch_size: int = 8, progress: bool = False) -> list[Prediction]:
        results = [Prediction(str(p)) for p in paths]
        ok: list[int] = []
        images: list[np.ndarray] = []
        for i, r in enumerate(results):
            try:
                image = read_image(r.path)
            except ImageReadError as exc:
                r.error = str(exc)
                continue
            r.original_size = image.shape[:2]
            images.append(image)
            ok.append(i)
        for start in tqdm(range(0, len(ok), batch_size), desc="predict", unit="batch", disable=not progress):
            chunk = ok[start : start + batch_size]
            maps, scores = self.score_arrays(images[start : start + len(chunk)])
            for j, i in enumerate(chunk):
                results[i].score = float(scores[j])
                results[i].anomaly_map = maps[j]
                results[i].normalized_score, results[i].decision = self.decide(results[i].score)
                results[i].is_anomalous = results[i].decision == "reject" if results[i].decision else None
        return results

    def defect_mask(self, prediction: Prediction) -> np.ndarray | None:
        """Binary defect mask at the calibrated pixel threshold, at the image's original size."""
        if self.calibration is None or prediction.anomaly_map is None:
            return None
        h, w = prediction.original_size
        amap = cv2.resize(prediction.anomaly_map, (w, h), interpolation=cv2.INTER_LINEAR)
        return amap >= self.calibration["pixel_threshold"]

    def write_outputs(self, results: list[Prediction], out_dir: str | Path) -> dict[str, Path]:
        """predictions.csv/.json, overlays/ and masks/ under ``out_dir``."""
        out_dir = Path(out_dir)
        (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
        (out_dir / "masks").mkdir(parents=True, exist_ok=True)
        names: dict[str, int] = {}
        rows = []
        vmax = self.calibration["pixel_max"] if self.calibration else None
        for r in results:
            row = {"path": r.path, "score": r.score, "normalized_score": r.normalized_score, "is_anomalous": r.is_anomalous,
                   "decision": r.decision, "error": r.error,
                   "overlay": "", "mask": ""}
            if not r.error and r.anomaly_map is not None:
                stem = Path(r.path).stem
                names[stem] = names.get(stem, 0) + 1
                if names[stem] > 1:
                    stem = f"{stem}_{names[stem]}"
                image = resize_image(read_image(r.path), self.image_size)
                scale = vmax if vmax is not None else float(r.anomaly_map.max())
                over = overlay(image, r.anomaly_map, scale)
                cv2.imwrite(str(out_dir / "overlays" / f"{stem}.png"), cv2.cvtColor(over, cv2.COLOR_RGB2BGR))
                row["overlay"] = f"overlays/{stem}.png"
                mask = self.defect_mask(r)
                if mask is not None:
                    cv2.imwrite(str(out_dir / "masks" / f"{stem}_mask.png"), mask.astype(np.uint8) * 255)
                    row["mask"] = f"masks/{stem}_mask.png"
            rows.append(row)
        frame = pd.DataFrame(rows)
        frame.to_csv(out_dir / "predictions.csv", index=False)
        (out_dir / "predictions.json").write_text(frame.to_json(orient="records", indent=2))
        return {"csv": out_dir / "predictions.csv", "json": out_dir / "predictions.json"}


class OnnxBundle:
    """Run an exported bundle with ONNX Runtime: RGB images in [0, 1] (N x 3 x S x S) -> (maps, scores).
    ``precision="int8"`` runs the quantised graph (``model.int8.onnx``) instead of the fp32 one.
    ``spin=False`` stops ORT's idle threads from spin-waiting for the next call: fastest when ORT has
    the cores to itself (spinning), but a service decoding uploads beside it gets more images
    through without (bench/serve_load.py)."""

    def __init__(self, bundle_dir: str | Path, metadata: dict[str, Any] | None = None, precision: str = "fp32", spin: bool = True) -> None:
        import onnxruntime

        self.dir = Path(bundle_dir)
        self.metadata = metadata if metadata is not None else json.loads((self.dir / METADATA_FILE).read_text())
        if self.metadata.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{self.dir / METADATA_FILE} is bundle format {self.metadata.get('format')!r}; this urd reads {BUNDLE_FORMAT!r} "
                             "(its graph normalises inside). Re-export the bundle from a model trained with this urd.")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8' (got {precision!r})")
        graph = self.dir / (INT8_ONNX_FILE if precision == "int8" else ONNX_FILE)
        if not graph.is_file():
            fix = "package it with package.quantize: int8 (params.yaml)" if precision == "int8" else "re-export it with the onnx format"
            raise FileNotFoundError(f"{graph} not found: this bundle has no {precision} ONNX graph; {fix}.")
        self.precision = precision
        options = onnxruntime.SessionOptions()
        # ORT would start one thread per core whatever else runs here; take this process's budget
        # instead (the pipeline sets it from urd.runtime.ThreadBudget).
        options.intra_op_num_threads = torch.get_num_threads()
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})
        return maps, scores

    def score(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """A scorer (urd.scoring): RGB batch in [0, 1] -> anomaly maps (N x S x S), image scores (N)."""
        maps, scores = self(images.numpy())
        return maps[:, 0], scores
