"""Run a trained model on new images: scores, normalised scores, decisions, maps, masks, overlays."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .calibrate import normalize_scores
from .checkpoint import load_model
from .data.images import ImageReadError, read_image, resize_image
from .data.layouts import IMAGE_SUFFIXES
from .data.torch_data import normalize
from .evaluate import overlay

CALIBRATION_FILE = "calibration.json"


@dataclass
class Prediction:
    path: str
    score: float = float("nan")
    normalized_score: float = float("nan")
    is_anomalous: bool | None = None
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
    """A trained model folder (model.safetensors + model.json [+ calibration.json]) ready to score images."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.graph, self.meta = load_model(self.model_dir, self.device)
        self.image_size = int(self.meta["preprocessing"]["image_size"])
        calibration = self.model_dir / CALIBRATION_FILE
        self.calibration = json.loads(calibration.read_text()) if calibration.is_file() else None

    @torch.no_grad()
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
            images.append(resize_image(image, self.image_size))
            ok.append(i)
        for start in tqdm(range(0, len(ok), batch_size), desc="predict", unit="batch", disable=not progress):
            chunk = ok[start : start + batch_size]
            batch = torch.from_numpy(np.stack(images[start : start + len(chunk)])).permute(0, 3, 1, 2).to(self.device)
            maps, scores = self.graph(normalize(batch))
            for j, i in enumerate(chunk):
                results[i].score = float(scores[j])
                results[i].anomaly_map = maps[j, 0].float().cpu().numpy()
        if self.calibration is not None:
            c = self.calibration
            for r in results:
                if not r.error:
                    r.normalized_score = float(normalize_scores(r.score, c["image_threshold"], c["image_min"], c["image_max"]))
                    r.is_anomalous = bool(r.score >= c["image_threshold"])
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
        import pandas as pd

        out_dir = Path(out_dir)
        (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
        (out_dir / "masks").mkdir(parents=True, exist_ok=True)
        names: dict[str, int] = {}
        rows = []
        vmax = self.calibration["pixel_max"] if self.calibration else None
        for r in results:
            row = {"path": r.path, "score": r.score, "normalized_score": r.normalized_score, "is_anomalous": r.is_anomalous, "error": r.error,
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
