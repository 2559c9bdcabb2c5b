import numpy as np
import pytest

from urd.config import ConfigError, Params, parse_params
from urd.data.demo import DemoSpec, generate_demo
from urd.data.manifest import build_manifest
from urd.data.prepare import load_foreground, load_textures, prepare_category, prepare_textures


def test_foreground_cache_roundtrip_and_object_coverage(tmp_path):
    generate_demo(tmp_path / "demo", DemoSpec(size=128, train=6, test_good=1, test_per_defect=1))
    params = parse_params({"dataset": {"root": str(tmp_path / "demo"), "image_size": 64, "val_fraction": 0.0},
                           "synthesis": {"foreground": {"widget": "otsu"}}})
    manifest = build_manifest("demo", tmp_path / "demo", "widget", 0.0, progress=False)
    summary = prepare_category(manifest, params, "widget", tmp_path / "prep", progress=False)
    assert summary["method"] == "otsu" and summary["images"] == 6
    assert 0.15 < summary["mean_coverage"] < 0.5  # the disc, not the conveyor
    paths = manifest.loc[manifest.split == "train", "path"].tolist()
    masks = load_foreground(tmp_path / "prep" / "foreground.npz", paths[::-1])
    assert masks.shape == (6, 64, 64) and masks.dtype == bool
    assert masks[-1, 32, 32] == 0 or masks[-1, 32 - 15, 32].any()  # bore in the middle is background
    assert not masks[:, 0, 0].any()  # corners are conveyor
    with pytest.raises(ValueError, match="rerun the prepare stage"):
        load_foreground(tmp_path / "prep" / "foreground.npz", ["elsewhere.png"])


def test_texture_cache_file(tmp_path):
    source = prepare_textures(parse_params({"dataset": {"image_size": 32}, "synthesis": {"dtd_root": str(tmp_path / "none")}}), tmp_path / "t.npy", progress=False)
    textures = np.load(tmp_path / "t.npy")
    assert source == "procedural" and textures.shape[1:] == (32, 32, 3) and textures.dtype == np.uint8
    loaded, recorded = load_textures(tmp_path / "t.npy")  # the source travels with the cache, for model.json and the card
    assert recorded == "procedural" and np.array_equal(loaded, textures)
    (tmp_path / "t.json").unlink()
    assert load_textures(tmp_path / "t.npy")[1] == "unknown"


def test_bad_foreground_method_in_params():
    with pytest.raises(ConfigError, match="synthesis.foreground"):
        parse_params({"synthesis": {"foreground": {"widget": "magic"}}})
    assert Params().synthesis.foreground == {}
