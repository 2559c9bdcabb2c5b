import cv2
import numpy as np
import pytest

from urd.data.foreground import foreground_mask, method_for
from urd.data.textures import procedural_textures, texture_cache

from .layouts_fixtures import write_image


def _object_image(bright_object=True, size=128):
    rng = np.random.default_rng(0)
    bg, fg = (30, 200) if bright_object else (220, 60)
    img = np.full((size, size, 3), bg, np.uint8)
    truth = np.zeros((size, size), np.uint8)
    cv2.ellipse(truth, (60, 70), (35, 25), 20, 0, 360, 1, -1)
    img[truth > 0] = fg
    img = np.clip(img.astype(int) + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, truth.astype(bool)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("method, bright", [("otsu", True), ("otsu_inv", False), ("grabcut", True), ("threshold:120", True)])
def test_foreground_covers_the_object_not_the_background(method, bright):
    img, truth = _object_image(bright)
    mask = foreground_mask(img, method)
    assert _iou(mask, truth) > 0.9
    assert mask[~truth].mean() < 0.05


def test_none_and_defaults_and_bad_method():
    img, _ = _object_image()
    assert foreground_mask(img, "none").all()
    assert method_for("screw", {}, "mvtec") == "otsu_inv" and method_for("bottle", {}, "mvtec") == "grabcut"
    assert method_for("carpet", {}, "mvtec") == "none" and method_for("widget", {"widget": "otsu"}, "demo") == "otsu"
    assert method_for("pcb3", {}, "visa") == "grabcut" and method_for("pcb3", {"pcb3": "none"}, "visa") == "none"
    assert method_for("bottle", {}, "folder") == "none"  # the release's defaults are for its datasets' categories
    with pytest.raises(ValueError, match="foreground method 'magic'"):
        foreground_mask(img, "magic")


def test_failed_segmentation_falls_back_to_whole_image():
    blank = np.full((64, 64, 3), 100, np.uint8)
    assert foreground_mask(blank, "threshold:200").all()


def test_procedural_textures_are_deterministic_and_varied():
    a = procedural_textures(32, count=8, seed=1)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, procedural_textures(32, count=8, seed=1))
    assert not np.array_equal(a, procedural_textures(32, count=8, seed=2))
    assert all(t.std() > 10 for t in a)


def test_dtd_layout_is_used_when_present(tmp_path):
    for cls in ("banded", "dotted"):
        for i in range(2):
            write_image(tmp_path / "images" / cls / f"{cls}_{i:04d}.jpg", size=(50, 70), seed=i)
    textures, source = texture_cache(32, tmp_path, progress=False)
    assert textures.shape == (4, 32, 32, 3) and source.startswith("dtd:")
    textures, source = texture_cache(32, tmp_path / "missing", count=4, progress=False)
    assert source == "procedural" and len(textures) == 4
