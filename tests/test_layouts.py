import time
from pathlib import Path

import numpy as np
import pytest

from urd.config import parse_params
from urd.data.demo import CATEGORIES, DemoSpec, generate_demo
from urd.data.images import ImageReadError, read_image, read_mask
from urd.data.layouts import DatasetLayoutError, read_layout
from urd.data.manifest import build_manifest, is_val

from .layouts_fixtures import make_btad, make_folder, make_mvtec, make_visa, write_image


def _summary(records):
    return sorted((r.split, r.label, r.defect_type, bool(r.mask_path)) for r in records)


@pytest.mark.parametrize("name", ["mvtec", "mpdd"])
def test_mvtec_layout(tmp_path, name):
    make_mvtec(tmp_path)
    records = read_layout(name, tmp_path, "bottle")
    assert len(records) == 16
    assert _summary(records).count(("train", 0, "good", False)) == 10
    defects = [r for r in records if r.label == 1]
    assert {r.defect_type for r in defects} == {"broken_large", "contamination"}
    for r in defects:
        assert r.mask_path.endswith(f"ground_truth/{r.defect_type}/{r.path[-7:-4]}_mask.png")
    assert all(not r.mask_path for r in records if r.label == 0)


@pytest.mark.parametrize("ext, mask_ext", [(".bmp", ".png"), (".png", ".png"), (".bmp", ".bmp")])
def test_btad_layout(tmp_path, ext, mask_ext):
    make_btad(tmp_path, "03", ext, mask_ext)
    records = read_layout("btad", tmp_path, "03")
    assert sum(r.split == "train" for r in records) == 10
    ko = [r for r in records if r.label == 1]
    assert len(ko) == 2 and all(r.defect_type == "ko" and r.mask_path.endswith(mask_ext) for r in ko)
    assert sum(r.split == "test" and r.label == 0 for r in records) == 2


def test_visa_layout_and_nonzero_masks(tmp_path):
    make_visa(tmp_path)
    records = read_layout("visa", tmp_path, "candle")
    assert sum(r.split == "train" for r in records) == 10
    anomalies = [r for r in records if r.label == 1]
    assert {r.defect_type for r in anomalies} == {"damaged_corner_of_packaging", "wax_melded_out_of_the_candle"}
    for r in anomalies:
        mask = read_mask(r.mask_path)
        assert mask.dtype == bool and mask.sum() == 15 * 15  # class index 1 or 2 -> defect
    assert all("other" not in r.path for r in records)


def test_folder_layout_with_optional_masks(tmp_path):
    make_folder(tmp_path)
    records = read_layout("folder", tmp_path, "bracket")
    dents = sorted((r for r in records if r.label == 1), key=lambda r: r.path)
    assert [r.mask_path.rsplit("/", 1)[-1] for r in dents] == ["d1.png", "d2_mask.png"]
    assert sum(r.split == "train" for r in records) == 10


def test_demo_dataset_layout_determinism_and_speed(tmp_path):
    spec = DemoSpec(seed=3, size=128, train=4, test_good=2, test_per_defect=2)
    start = time.perf_counter()
    generate_demo(tmp_path / "a", spec)
    assert time.perf_counter() - start < 10
    generate_demo(tmp_path / "b", spec)
    for category, defects in CATEGORIES.items():
        records = read_layout("demo", tmp_path / "a", category)
        assert {r.defect_type for r in records if r.label} == set(defects)
        assert len(defects) >= 3
        for r in records:
            twin = r.path.replace("/a/", "/b/")
            assert np.array_equal(read_image(r.path), read_image(twin))
            if r.label:
                mask = read_mask(r.mask_path)
                assert 0 < mask.sum() < 0.2 * mask.size
    # good images vary (lighting, position, noise) but are not identical
    a, b = (read_image(tmp_path / "a" / "widget" / "train" / "good" / f"00{i}.png").astype(int) for i in (0, 1))
    assert np.abs(a - b).mean() > 2


def test_demo_refuses_to_overwrite_other_data(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_demo(tmp_path, DemoSpec(train=1, test_good=1, test_per_defect=1, size=64))
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        read_layout("mvtec", tmp_path / "nowhere", "bottle")
    make_mvtec(tmp_path)
    with pytest.raises(DatasetLayoutError, match="category folder 'bottel'"):
        read_layout("mvtec", tmp_path, "bottel")
    with pytest.raises(DatasetLayoutError, match="split_csv"):
        read_layout("visa", tmp_path, "bottle")
    with pytest.raises(ValueError, match="Unknown dataset layout"):
        read_layout("kaggle", tmp_path, "bottle")


def test_val_split_is_stable_when_images_are_added(tmp_path):
    make_mvtec(tmp_path, n_train=40)
    before = build_manifest("mvtec", tmp_path, "bottle", 0.25, progress=False)
    for i in range(40, 80):
        write_image(tmp_path / "bottle" / "train" / "good" / f"{i:03d}.png", seed=i)
    after = build_manifest("mvtec", tmp_path, "bottle", 0.25, progress=False)
    old = dict(zip(before.path, before.split))
    assert all(old[p] == s for p, s in zip(after.path, after.split) if p in old)
    share = (after.split == "val").sum() / (after.split != "test").sum()
    assert 0.1 < share < 0.4 and set(before.split) == {"train", "val", "test"}
    assert is_val("x/003.png", 0.25) == is_val("y/003.png", 0.25)  # the name decides


def test_manifest_columns(tmp_path):
    make_mvtec(tmp_path)
    m = build_manifest("mvtec", tmp_path, "bottle", 0.2, progress=False)
    row = m[m.label == 1].iloc[0]
    assert (row.width, row.height, row.channels) == (48, 40, 3)
    assert len(row.sha256) == 64 and row.readable and row.mask_values == "0 255"
    assert (row.mask_width, row.mask_height) == (48, 40)


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(bad)


def test_a_demo_from_an_older_generator_is_refused_not_silently_used(tmp_path):
    import json

    from urd.config import Params
    from urd.data.demo import DEMO_VERSION
    from urd.data.manifest import ingest_category

    root = generate_demo(tmp_path / "demo", DemoSpec(train=2, test_good=1, test_per_defect=1, size=64))
    params = Params(dataset={"name": "demo", "root": str(root), "categories": ["tiles"]})
    assert len(ingest_category(params, "tiles", progress=False)) == 6  # current version: used as it is
    spec = json.loads((root / "demo.json").read_text())
    (root / "demo.json").write_text(json.dumps(spec | {"version": DEMO_VERSION - 1}))
    with pytest.raises(ValueError, match=f"version {DEMO_VERSION - 1}.*--overwrite"):
        ingest_category(params, "tiles", progress=False)


def test_excluded_images_are_left_out_and_a_pattern_matching_nothing_is_an_error(tmp_path):
    from .layouts_fixtures import make_btad

    make_btad(tmp_path, "01")
    full = build_manifest("btad", tmp_path, "01", 0.0, progress=False)
    test_ko = sorted(p for p in full["path"] if "/test/ko/" in p)
    name = Path(test_ko[0]).name
    fewer = build_manifest("btad", tmp_path, "01", 0.0, progress=False, exclude=[f"01/test/ko/{name}", "02/train/ok/*"])
    assert len(fewer) == len(full) - 1 and not any(p.endswith(f"/test/ko/{name}") for p in fewer["path"])
    with pytest.raises(ValueError, match="01/test/ko/nope.bmp"):
        build_manifest("btad", tmp_path, "01", 0.0, progress=False, exclude=["01/test/ko/nope.bmp"])
    assert parse_params({"dataset": {"exclude": ["01/test/ko/0001.bmp"]}}).dataset.exclude == ["01/test/ko/0001.bmp"]
