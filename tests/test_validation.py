import json
import shutil

import cv2
import numpy as np
import pytest

from urd.data.validation import DataValidationError, run_gate, validate
from urd.config import DatasetParams
from urd.data.manifest import build_manifest

from .layouts_fixtures import make_mvtec, write_image, write_mask


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An MVTec-layout category with one instance of every defect the gate must catch."""
    root = make_mvtec(tmp_path_factory.mktemp("planted"), n_train=12)
    base = root / "bottle"
    (base / "train" / "good" / "000.png").write_bytes(b"\x89PNG\r\n truncated")  # corrupt
    write_image(base / "train" / "good" / "001.png", channels=1, seed=1)  # grey in an RGB category
    write_image(base / "test" / "broken_large" / "002.png", seed=70)  # defect without mask
    write_image(base / "test" / "contamination" / "002.png", seed=80)
    write_mask(base / "ground_truth" / "contamination" / "002_mask.png", size=(20, 24))  # wrong mask size
    write_image(base / "test" / "contamination" / "003.png", seed=90)
    mask = np.zeros((40, 48), np.uint8)
    mask[2:10, 2:10] = 128
    mask[20:30, 20:30] = 255
    cv2.imwrite(str(base / "ground_truth" / "contamination" / "003_mask.png"), mask)  # not binary
    shutil.copy(base / "train" / "good" / "005.png", base / "test" / "good" / "leak.png")  # train image in test
    write_image(base / "train" / "good" / "big.png", size=(64, 64), seed=110)  # odd size
    manifest = build_manifest("mvtec", root, "bottle", 0.0, progress=False)
    # a defect image listed in the train split (e.g. a mislabelled folder)
    manifest.loc[manifest.path.str.endswith("contamination/000.png"), "split"] = "train"
    return manifest


EXPECTED = {
    "check_readable": "train/good/000.png",
    "check_channels": "train/good/001.png",
    "check_mask_present": "broken_large/002.png",
    "check_mask_size": "contamination/002.png",
    "check_mask_binary": "contamination/003.png",
    "check_no_leak": "test/good/leak.png",
    "check_train_is_good": "contamination/000.png",
    "check_size_consistent": "train/good/big.png",
}


def test_every_planted_defect_is_caught_and_named(planted, tmp_path):
    with pytest.raises(DataValidationError) as err:
        validate(planted, DatasetParams(name="mvtec", min_train_images=4), "bottle", tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["success"] is False
    by_rule = {f["rule"]: f["files"] for f in summary["failures"]}
    for rule, file in EXPECTED.items():
        assert any(f.endswith(file) for f in by_rule[rule]), (rule, by_rule.get(rule))
        assert rule in str(err.value) and file in str(err.value)
    assert any(f.endswith("train/good/005.png") for f in by_rule["check_no_leak"])  # both sides of the leak
    assert (tmp_path / "data_docs" / "index.html").is_file()


def test_too_few_training_images(tmp_path):
    make_mvtec(tmp_path, n_train=3)
    manifest = build_manifest("mvtec", tmp_path, "bottle", 0.0, progress=False)
    report = run_gate(manifest, DatasetParams(name="mvtec", min_train_images=5), "bottle")
    assert not report.success
    assert [f["rule"] for f in report.failures] == ["check_enough_train"]
    assert "3 training images" in report.message()


def test_clean_data_passes_and_writes_summary(tmp_path):
    make_mvtec(tmp_path / "data")
    manifest = build_manifest("mvtec", tmp_path / "data", "bottle", 0.2, progress=False)
    report = validate(manifest, DatasetParams(name="mvtec", min_train_images=4), "bottle", tmp_path / "report")
    assert report.success and report.failures == []
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["success"] is True


def test_masks_optional_when_configured(tmp_path):
    make_mvtec(tmp_path)
    for m in (tmp_path / "bottle" / "ground_truth").rglob("*.png"):
        m.unlink()
    manifest = build_manifest("mvtec", tmp_path, "bottle", 0.2, progress=False)
    assert not run_gate(manifest, DatasetParams(name="mvtec", min_train_images=4), "bottle").success
    assert run_gate(manifest, DatasetParams(name="mvtec", min_train_images=4, require_masks=False), "bottle").success
