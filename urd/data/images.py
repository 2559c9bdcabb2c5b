"""Reading and resizing images and masks: one implementation for training, evaluation and inference."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Preprocessing recorded in every bundle: OpenCV INTER_AREA resize (anti-aliased when shrinking)
# to a square, RGB, scaled to [0, 1]; the model normalises with its backbone's constants.
RESIZE_METHOD = "cv2.INTER_AREA"


class ImageReadError(OSError):
    """An image or mask file that cannot be read; the message names the file."""


def _decode_bytes(data: np.ndarray, name: str) -> np.ndarray:
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageReadError(
            f"{name}: not a readable image (corrupt, truncated or an unsupported format). Replace or remove the file."
        )
    return image


def _decode(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found. Check the dataset folder, or remove the entry that names it.")
    return _decode_bytes(np.fromfile(str(path), dtype=np.uint8), str(path))


def to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image // 257).astype(np.uint8)
    image = image.astype(np.float64)
    peak = image.max() if image.size else 1.0
    return np.clip(image / (peak if peak > 1 else 1.0) * (255 if peak <= 1 else 1), 0, 255).astype(np.uint8)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    image = to_uint8(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[..., 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """Any common format, grey/RGB/RGBA, 8 or 16 bit -> H x W x 3 uint8 RGB."""
    return _to_rgb(_decode(path))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """An encoded image file's bytes (PNG, JPEG, BMP, TIFF...) -> H x W x 3 uint8 RGB, as read_image."""
    return _to_rgb(_decode_bytes(np.frombuffer(data, dtype=np.uint8), name))


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask -> H x W bool, non-zero = defect (MVTec 0/255, VisA 0/class index alike)."""
    mask = _decode(path)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask with bilinear interpolation and binarise at 0.5 (the paper's protocol)."""
    if mask.shape[:2] == (size, size):
        return mask.astype(bool)
    resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return resized >= 0.5
