"""Foreground masks for object categories: synthetic anomalies are drawn on the object, not the background.

Methods (``synthesis.foreground.<category>`` in params):

* ``none``      - the whole image (textures)
* ``otsu``      - Otsu threshold of the grey image, bright object on a dark background
* ``otsu_inv``  - Otsu threshold inverted, dark object on a bright background
* ``grabcut``   - OpenCV GrabCut seeded with the frame inside a 1-pixel border, 11 iterations
* ``threshold:<0-255>`` - fixed grey threshold, bright object

Defaults per dataset (the demo's widget: otsu) follow the authors' release (https://github.com/hito2448/URD at commit 95dd027): for MVTec AD Otsu (inverted) for
capsule and screw, GrabCut for seven objects, none for the textures and transistor; for VisA
GrabCut for all 12 categories. ``synthesis.foreground.<category>`` overrides them. Masks are
computed once per image at the training resolution and cached by the prepare stage.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_FOREGROUND = {
    "demo": {"widget": "otsu"},  # the generated demo: a bright part on a dark tray
    "mvtec": {
        "capsule": "otsu_inv",
        "screw": "otsu_inv",
        **{c: "grabcut" for c in ("bottle", "cable", "hazelnut", "metal_nut", "pill", "toothbrush", "zipper")},
    },
    "visa": {c: "grabcut" for c in ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                                    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")},
}
MIN_COVERAGE = 0.01  # a mask covering less than this is treated as a failed segmentation
# GrabCut as in the authors' release: 11 iterations from the rectangle (1, 1, w - 1, h - 1)
# (x, y, width, height; OpenCV clips the part past the right and bottom edge).
GRABCUT_ITERATIONS = 11


def method_for(category: str, configured: dict[str, str], dataset: str = "folder") -> str:
    """The configured method of ``category``, else the release's default for ``dataset``, else none."""
    return configured.get(category, DEFAULT_FOREGROUND.get(dataset, {}).get(category, "none"))


def validate_method(method: str) -> str:
    if method in ("none", "otsu", "otsu_inv", "grabcut"):
        return method
    if method.startswith("threshold:"):
        value = method.split(":", 1)[1]
        if value.isdigit() and 0 <= int(value) <= 255:
            return method
    raise ValueError(
        f"Unknown foreground method {method!r}; use none, otsu, otsu_inv, grabcut or threshold:<0-255> "
        "(params.yaml synthesis.foreground.<category>)."
    )


def foreground_mask(image: np.ndarray, method: str) -> np.ndarray:
    """H x W x 3 uint8 RGB -> H x W bool foreground. Falls back to the whole image if the
    segmentation finds (almost) nothing, so synthesis never runs out of room."""
    validate_method(method)
    h, w = image.shape[:2]
    if method == "none":
        return np.ones((h, w), bool)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if method in ("otsu", "otsu_inv"):
        flag = cv2.THRESH_BINARY_INV if method == "otsu_inv" else cv2.THRESH_BINARY
        _, mask = cv2.threshold(grey, 0, 1, flag | cv2.THRESH_OTSU)
        mask = mask.astype(bool)
    elif method == "grabcut":
        gc = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's GMM initialisation draws from OpenCV's RNG: keep it deterministic
        cv2.grabCut(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), gc, (1, 1, w - 1, h - 1), bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_RECT)
        mask = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    else:
        mask = grey > int(method.split(":", 1)[1])
    if mask.mean() < MIN_COVERAGE:
        return np.ones((h, w), bool)
    return mask
