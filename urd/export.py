"""The inference bundle: a self-contained folder a serving process can load without urd's training code.

    <bundle>/model.onnx             the inference graph (images -> anomaly_map, score), dynamic batch
    <bundle>/model.torchscript      the same graph as TorchScript
    <bundle>/model.int8.onnx        optional (package.quantize: int8): the ONNX graph with the
                                    student's convolutions quantised to int8, calibrated on val normals
    <bundle>/model.safetensors      the weights (for urd.checkpoint.load_model)
    <bundle>/model.json             architecture and preprocessing (as in the model folder)
    <bundle>/metadata.json          everything a user needs to run and trust it: input size, resize
                                    method, normalisation, thresholds and score normalisation,
                                    backbone and weights source, metrics, lineage

Thresholds in metadata.json are read at load time, so a user may edit them there. Nothing is
unpickled: ONNX is a protobuf, TorchScript an archive of TorchScript code and tensors, weights
are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_model
from .files import (BUNDLE_FORMAT, CALIBRATION_FILE, INT8_ONNX_FILE, METADATA_FILE, MODEL_META, MODEL_WEIGHTS, ONNX_FILE,
                    TORCHSCRIPT_FILE, atomic_write_text)



def export_bundle(
    model_dir: str | Path,
    out_dir: str | Path,
    formats: list[str] = ("torchscript", "onnx"),
    opset: int = 17,
    metrics: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the bundle of the trained (and calibrated) model in ``model_dir`` to ``out_dir``.

    Built in a temporary folder and moved into place, so a failed export leaves nothing behind.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace the bundle there.")
    graph, meta = load_model(model_dir)
    calibration_file = model_dir / CALIBRATION_FILE
    calibration = json.loads(calibration_file.read_text()) if calibration_file.is_file() else None
    size = meta["preprocessing"]["image_size"]
    example = torch.rand(2, 3, size, size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        shutil.copy2(model_dir / MODEL_WEIGHTS, tmp / MODEL_WEIGHTS)
        shutil.copy2(model_dir / MODEL_META, tmp / MODEL_META)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if "torchscript" in formats:
                torch.jit.save(torch.jit.trace(graph, example), str(tmp / TORCHSCRIPT_FILE))
            if "onnx" in formats:
                # The TorchScript-based exporter: the graph is static apart from the batch size.
                torch.onnx.export(
                    graph, (example,), str(tmp / ONNX_FILE), input_names=["images"], output_names=["anomaly_map", "score"],
                    dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
                    opset_version=opset, dynamo=False,
                )
        metadata = {
            "format": BUNDLE_FORMAT,
            "urd_version": meta.get("urd_version"),
            "category": meta["category"],
            "dataset": meta["dataset"],
            "inputs": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32", "range": "RGB in [0, 1]; normalised inside the graph"},
            "outputs": {"anomaly_map": ["batch", 1, size, size], "score": ["batch"]},
            "preprocessing": meta["preprocessing"],
            "architecture": meta["architecture"],
            "weights_source": meta["weights_source"],
            "thresholds": calibration,
            "metrics": metrics,
            "lineage": lineage or {},
            "training": meta.get("training", {}),
            "files": {"onnx": ONNX_FILE if "onnx" in formats else None, "torchscript": TORCHSCRIPT_FILE if "torchscript" in formats else None,
                      "weights": MODEL_WEIGHTS},
        }
        atomic_write_text(tmp / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


class _ImageReader:
    """onnxruntime's calibration protocol over an N x 3 x S x S float array, in batches."""

    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        self.batches = iter([{"images": np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)}
                             for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_bundle(bundle_dir: str | Path, calibration_images: np.ndarray, batch_size: int = 8) -> Path:
    """Write ``model.int8.onnx`` next to the bundle's fp32 graph: ONNX Runtime static quantisation
    (QDQ, int8 per-channel weights, uint8 activations with min-max ranges) of the *student's*
    convolutions, calibrated on ``calibration_images`` (RGB in [0, 1]; the val normals, never the
    test split). The teacher and the anomaly map (cosines, upsampling, blur) stay fp32: the teacher's
    features go straight into the cosine distances, and quantising them too broke the ranking of
    the scores (bench/results/int8_bundle_cpu.md)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    bundle_dir = Path(bundle_dir)
    if len(calibration_images) == 0:
        raise ValueError("int8 quantisation needs calibration images (the val normals); the val split is empty. "
                         "Set dataset.val_fraction above 0 or package.quantize: none.")
    source = bundle_dir / ONNX_FILE
    convs = [n.name for n in onnx.load(str(source)).graph.node if n.op_type in ("Conv", "ConvTranspose") and n.name.startswith("/student/")]
    target = bundle_dir / INT8_ONNX_FILE
    tmp = target.with_name(f".{target.name}.tmp")
    quantize_static(
        str(source), str(tmp), _ImageReader(calibration_images, batch_size), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "ConvTranspose"], nodes_to_quantize=convs, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )
    tmp.replace(target)
    return target


def int8_parity(bundle_dir: str | Path, rows, batch_size: int = 16) -> dict[str, Any]:
    """How far the int8 graph is from the fp32 one on ``rows`` (manifest rows with labels and masks,
    normally the test split: this is reported, never used to choose anything): Spearman correlation
    of the image scores, and image / pixel AUROC of both graphs."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from .inference import OnnxBundle
    from .scoring import score_rows

    graphs = {"fp32": OnnxBundle(bundle_dir), "int8": OnnxBundle(bundle_dir, precision="int8")}
    size = int(graphs["fp32"].metadata["preprocessing"]["image_size"])
    scored = {name: score_rows(graph.score, rows, size, batch_size) for name, graph in graphs.items()}
    labels = rows["label"].to_numpy().astype(bool)
    pixels = scored["fp32"][2].ravel()
    out: dict[str, Any] = {"images": int(len(rows))}
    out["image_score_spearman"] = float(spearmanr(scored["fp32"][1], scored["int8"][1]).statistic)
    for name, (maps, scores, _) in scored.items():
        if labels.any() and not labels.all():
            out[f"{name}_image_auroc"] = float(roc_auc_score(labels, scores))
        if pixels.any() and not pixels.all():
            out[f"{name}_pixel_auroc"] = float(roc_auc_score(pixels, maps.ravel()))
    return out


def add_int8_graph(bundle_dir: str | Path, manifest, image_size: int) -> dict[str, Any]:
    """Package the int8 graph (``package.quantize: int8``): model.int8.onnx calibrated on the val
    normals of ``manifest``, and its parity with fp32 on the test split (reported only, never used
    to choose) in metadata.json, where the model card reads it. Returns that parity."""
    from .data.torch_data import EvalDataset, eval_loader

    bundle_dir = Path(bundle_dir)
    val = manifest[manifest["split"] == "val"]
    images = [b["image"].numpy() for b in eval_loader(EvalDataset(val, image_size), 16)]
    quantize_bundle(bundle_dir, np.concatenate(images) if images else np.zeros((0, 3, image_size, image_size), np.float32))
    metadata = json.loads((bundle_dir / METADATA_FILE).read_text())
    metadata["files"]["onnx_int8"] = INT8_ONNX_FILE
    parity = int8_parity(bundle_dir, manifest[manifest["split"] == "test"].reset_index(drop=True))
    metadata["int8"] = {"calibration_images": int(len(val)), "calibration_split": "val", "parity_on_test": parity}
    atomic_write_text(bundle_dir / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
    return parity
