"""What an upload must be before it reaches a model: an 8-bit colour image (PNG, JPEG, BMP, TIFF)
within the byte and pixel limits. Anything else is refused with a message naming the problem; a
refused upload never reaches the ledger or the image store."""

from __future__ import annotations

import io

import cv2
import numpy as np


class UploadError(ValueError):
    """A refused upload; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone, without decoding the pixels (so a decompression bomb is
    refused before it is expanded); None where Pillow does not know the format."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - not an image Pillow can read; OpenCV decides below
        return None


def _truncated(data: bytes) -> bool:
    """A PNG without its IEND chunk or a JPEG without its end-of-image marker: decoders fill the
    missing rows with grey and say nothing, so the check is made here."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in data[-64:]
    if data.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in data[-4096:]
    return False


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """An upload's bytes -> H x W x 3 uint8 RGB, decoded as ``urd predict`` decodes a file."""
    if not data:
        raise UploadError("the upload is empty; send the image file's bytes as the request body or as the multipart field 'image'")
    if len(data) > max_bytes:
        raise UploadError(f"the upload is {len(data)} bytes, over the limit of {max_bytes} (serve.max_upload_bytes)", status=413)
    size = _header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise UploadError(f"the image is {size[0]} x {size[1]} pixels, over the limit of {max_pixels} (serve.max_pixels)", status=413)
    if _truncated(data):
        raise UploadError("the image file is truncated (its end marker is missing): the upload was cut off; send the whole file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UploadError("the upload is not a readable image (corrupt, truncated, or not PNG/JPEG/BMP/TIFF)")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise UploadError(f"the image is {image.shape[1]} x {image.shape[0]} pixels, over the limit of {max_pixels} (serve.max_pixels)", status=413)
    if image.dtype != np.uint8:
        raise UploadError(f"the image is {image.dtype.itemsize * 8}-bit per channel; the models take 8-bit colour images. "
                          "Set the camera to 8-bit output or convert the image before sending it")
    if image.ndim == 2 or image.shape[2] == 1:
        raise UploadError("the image is grayscale; the models were trained on colour images. Set the camera to colour (RGB) output")
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
