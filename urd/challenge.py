"""The challenge set: golden samples written into every bundle at package time, so a serving process
can prove that the model it is about to switch to decides as it did when it was packaged.

    <bundle>/challenge/normal_<k>.png     held-out normal images (the val split), at the model's size
    <bundle>/challenge/anomaly_<k>.png    the same kind of images with a synthetic anomaly (Perlin
                                          mask + procedural texture, as in training)
    <bundle>/challenge.json               per image: its recorded score under every format the bundle
                                          holds (eager PyTorch, ONNX fp32, ONNX int8) and its decision

The images are chosen away from the thresholds (by more than the tolerance), so that a decision
cannot flip on the last bits of a float on another CPU; the check then asks every decision to
match and every score to be within ``abs + rel * |score|`` of the recorded one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

from .calibrate import decide, review_threshold
from .files import CHALLENGE_DIR, CHALLENGE_FILE, METADATA_FILE, atomic_write_text

TOLERANCE = {"abs": 1e-4, "rel": 1e-3}
Scorer = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


def _scorers(bundle_dir: Path, metadata: dict[str, Any]) -> dict[str, Scorer]:
    from .checkpoint import load_model
    from .inference import OnnxBundle
    from .scoring import torch_scorer

    graph, _ = load_model(bundle_dir)
    scorers: dict[str, Scorer] = {"torch": torch_scorer(graph, torch.device("cpu"))}
    if metadata["files"].get("onnx"):
        scorers["onnx"] = OnnxBundle(bundle_dir, metadata).score
    if metadata["files"].get("onnx_int8"):
        scorers["onnx_int8"] = OnnxBundle(bundle_dir, metadata, precision="int8").score
    return scorers


def _far_from(scores: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """True where a score is further from every threshold than 10 tolerances."""
    margin = 10 * (TOLERANCE["abs"] + TOLERANCE["rel"] * np.abs(scores))
    return np.all([np.abs(scores - t) > margin for t in thresholds], axis=0)


def write_challenge_set(bundle_dir: str | Path, manifest, count: int = 4, seed: int = 0) -> dict[str, Any]:
    """Write the challenge set of the bundle in ``bundle_dir`` from the val normals of ``manifest``
    (never the test split). Needs a calibrated bundle. Returns what challenge.json holds."""
    from .config import SynthesisParams
    from .data.synthesis import AnomalySynthesizer
    from .data.textures import procedural_textures
    from .data.torch_data import EvalDataset, eval_loader

    bundle_dir = Path(bundle_dir)
    metadata = json.loads((bundle_dir / METADATA_FILE).read_text())
    thresholds = metadata.get("thresholds")
    if not thresholds:
        raise ValueError(f"{bundle_dir}: the bundle is not calibrated (no thresholds in {METADATA_FILE}); a challenge set records decisions. "
                         "Calibrate the model before packaging it.")
    size = int(metadata["preprocessing"]["image_size"])
    val = manifest[manifest["split"] == "val"].sort_values("path").reset_index(drop=True)
    if not len(val):
        raise ValueError("a challenge set needs val images (held-out normals); the val split is empty. Set dataset.val_fraction above 0.")
    normals = torch.cat([b["image"] for b in eval_loader(EvalDataset(val, size), 16)])
    # RGB in [0, 1] as 8-bit, exactly what the PNG files will hold
    normals = torch.round(normals * 255) / 255
    synth = AnomalySynthesizer(SynthesisParams(beta_range=(0.6, 1.0)), torch.from_numpy(procedural_textures(size, 8, seed)).permute(0, 3, 1, 2),
                               seed=seed)
    anomalies, _ = synth(normals)
    anomalies = torch.round(anomalies * 255) / 255
    scorers = _scorers(bundle_dir, metadata)
    cuts = [review_threshold(thresholds), float(thresholds["image_threshold"])]
    reference = "onnx" if "onnx" in scorers else "torch"
    chosen: list[tuple[str, torch.Tensor]] = []
    for kind, images in (("normal", normals), ("anomaly", anomalies)):
        _, scores = scorers[reference](images)
        keep = np.flatnonzero(_far_from(np.asarray(scores, np.float64), cuts))
        # normals: the most typical first; anomalies: the clearest first
        keep = keep[np.argsort(scores[keep])] if kind == "normal" else keep[np.argsort(-scores[keep])]
        chosen += [(kind, images[i]) for i in keep[:count]]
    if not chosen:
        raise ValueError(f"{bundle_dir}: every candidate challenge image scores within the tolerance of a threshold; cannot build a challenge set.")
    batch = torch.stack([image for _, image in chosen])
    recorded = {name: np.asarray(scorer(batch)[1], np.float64) for name, scorer in scorers.items()}
    folder = bundle_dir / CHALLENGE_DIR
    folder.mkdir(exist_ok=True)
    entries = []
    counters = {"normal": 0, "anomaly": 0}
    for i, (kind, image) in enumerate(chosen):
        name = f"{kind}_{counters[kind]}.png"
        counters[kind] += 1
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        cv2.imwrite(str(folder / name), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        scores = {fmt: float(s[i]) for fmt, s in recorded.items()}
        decisions = {fmt: decide(s, *cuts) for fmt, s in scores.items()}
        entries.append({"file": f"{CHALLENGE_DIR}/{name}", "kind": kind, "scores": scores, "decisions": decisions})
    formats_agree = all(len(set(e["decisions"].values())) == 1 for e in entries)
    challenge = {"tolerance": TOLERANCE, "source": "val split (normals) + synthetic anomalies on them", "thresholds": cuts,
                 "formats": sorted(recorded), "formats_agree": formats_agree, "images": entries}
    atomic_write_text(bundle_dir / CHALLENGE_FILE, json.dumps(challenge, indent=2) + "\n")
    return challenge


@dataclass
class ChallengeResult:
    passed: bool
    images: int = 0
    max_deviation: float = 0.0  # largest |score - recorded| seen
    problems: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.problems[:3]) + (f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else "")


def check_challenge_set(bundle_dir: str | Path, scorer: Scorer, fmt: str, read: Callable[[bytes, str], np.ndarray] | None = None) -> ChallengeResult:
    """Score the bundle's challenge images with ``scorer`` (the model a service is about to serve, in
    format ``fmt``: torch, onnx or onnx_int8) and compare with what was recorded for that format.
    ``read`` decodes an image file's bytes as the caller decodes uploads (default urd's decoder)."""
    from .data.images import decode_image, resize_image
    from .data.torch_data import to_unit

    bundle_dir = Path(bundle_dir)
    file = bundle_dir / CHALLENGE_FILE
    if not file.is_file():
        return ChallengeResult(False, problems=[f"{file} not found: the bundle has no challenge set (package it with this urd)"])
    challenge = json.loads(file.read_text())
    read = read or decode_image
    tol = challenge["tolerance"]
    entries = [e for e in challenge["images"] if fmt in e["scores"]]
    if not entries:
        return ChallengeResult(False, problems=[f"the challenge set has no recorded scores for format {fmt!r} (it has {challenge['formats']})"])
    size = None
    images = []
    for e in entries:
        path = bundle_dir / e["file"]
        image = read(path.read_bytes(), str(path))
        size = size or image.shape[0]
        images.append(resize_image(image, size))
    _, scores = scorer(to_unit(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)))
    result = ChallengeResult(True, images=len(entries))
    cuts = challenge["thresholds"]
    for e, score in zip(entries, np.asarray(scores, np.float64)):
        want = e["scores"][fmt]
        deviation = abs(score - want)
        result.max_deviation = max(result.max_deviation, float(deviation))
        if deviation > tol["abs"] + tol["rel"] * abs(want):
            result.problems.append(f"{e['file']}: score {score:.6f}, recorded {want:.6f}")
        if decide(score, *cuts) != e["decisions"][fmt]:
            result.problems.append(f"{e['file']}: decision {decide(score, *cuts)}, recorded {e['decisions'][fmt]}")
    result.passed = not result.problems
    return result
