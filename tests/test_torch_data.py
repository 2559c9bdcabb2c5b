import cv2
import numpy as np
import pytest
import torch

from urd.data.images import ImageReadError
from urd.data.manifest import build_manifest
from urd.data.torch_data import EvalDataset, TrainDataset, to_unit, train_batches
from urd.model.backbone import IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, build_encoder

from .layouts_fixtures import make_mvtec, write_image


def test_train_items_and_endless_batches(tmp_path):
    make_mvtec(tmp_path, n_train=6)
    paths = sorted(str(p) for p in (tmp_path / "bottle" / "train" / "good").iterdir())
    fg = np.zeros((6, 32, 32), bool)
    fg[:, 8:24, 8:24] = True
    ds = TrainDataset(paths, 32, fg)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert item["foreground"].shape == (1, 32, 32) and item["foreground"].sum() == 256
    batches = train_batches(ds, batch_size=4, num_workers=0, seed=1)
    seen = [next(batches)["image"].shape[0] for _ in range(5)]  # more batches than one epoch holds
    assert seen == [4] * 5
    again = train_batches(ds, batch_size=4, num_workers=0, seed=1)
    assert torch.equal(next(again)["image"], next(train_batches(ds, 4, 0, seed=1))["image"])


def test_eval_items_have_resized_binary_masks(tmp_path):
    make_mvtec(tmp_path)
    manifest = build_manifest("mvtec", tmp_path, "bottle", 0.2, progress=False)
    test = manifest[manifest.split == "test"]
    ds = EvalDataset(test, 32)
    defect = next(ds[i] for i in range(len(ds)) if ds[i]["label"] == 1)
    assert defect["image"].shape == (3, 32, 32) and defect["image"].dtype == torch.float32
    assert set(defect["mask"].unique().tolist()) == {0.0, 1.0}
    # the 15x15 box of a 40x48 mask covers about 15/40 x 15/48 of the resized mask
    assert abs(defect["mask"].mean().item() - (15 / 40) * (15 / 48)) < 0.05
    good = next(ds[i] for i in range(len(ds)) if ds[i]["label"] == 0)
    assert good["mask"].sum() == 0 and good["defect_type"] == "good"


def test_models_take_unit_range_rgb_and_normalise_with_their_backbones_constants():
    assert to_unit(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).eq(1).all() and to_unit(torch.ones(1, 3, 1, 1) * 0.5).eq(0.5).all()
    x = torch.ones(1, 3, 2, 2)
    for name, mean, std in (("resnet18", IMAGENET_MEAN, IMAGENET_STD), ("efficientnet_lite0", LITE_MEAN, LITE_STD)):
        encoder = build_encoder(name)
        torch.testing.assert_close(encoder.normalize(x)[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))
        assert not any("normalize" in k for k in encoder.state_dict())  # constants, not weights
    # EfficientNet-Lite's own convention: (pixel - 127) / 128
    torch.testing.assert_close(build_encoder("efficientnet_lite0").normalize(torch.full((1, 3, 1, 1), 255.0) / 255), torch.full((1, 3, 1, 1), 1.0))


def test_bad_training_image_is_named(tmp_path):
    good = write_image(tmp_path / "a.png")
    bad = tmp_path / "b.png"
    bad.write_bytes(b"nope")
    ds = TrainDataset([str(good), str(bad)], 32)
    with pytest.raises(ImageReadError, match="b.png"):
        ds[1]


def test_train_images_are_decoded_once_and_served_as_copies(tmp_path, monkeypatch):
    import urd.data.torch_data as torch_data

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], np.full((40, 40, 3), 60 * i, np.uint8))
    reads = []
    real = torch_data.image_tensor
    monkeypatch.setattr(torch_data, "image_tensor", lambda path, size: reads.append(path) or real(path, size))
    ds = torch_data.TrainDataset(paths, 32)
    first = ds[1]["image"]
    first.zero_()  # a caller modifying its batch does not change what the next epoch reads
    again = ds[1]["image"]
    assert reads == [paths[1]] and int(again[0, 0, 0]) == 60
    monkeypatch.setattr(torch_data, "CACHE_LIMIT_BYTES", 2 * 3 * 32 * 32)  # three images do not fit: read every time
    ds = torch_data.TrainDataset(paths, 32)
    ds[0], ds[0]
    assert ds.cache is None and reads[1:] == [paths[0], paths[0]]


def test_incomplete_batches_are_dropped_or_kept():
    from urd.data.torch_data import EpochBatchSampler

    dropped = EpochBatchSampler(10, 4, seed=0)
    kept = EpochBatchSampler(10, 4, seed=0, keep_incomplete=True)
    first = [next(it) for it in [iter(dropped)] for _ in range(2)]
    assert [len(b) for b in first] == [4, 4] and dropped.per_epoch == 2
    epoch = [b for it in [iter(kept)] for b in (next(it) for _ in range(3))]
    assert [len(b) for b in epoch] == [4, 4, 2] and sorted(sum(epoch, [])) == list(range(10))  # every image once per epoch
    resumed = next(iter(EpochBatchSampler(10, 4, seed=0, start_batch=2, keep_incomplete=True)))
    assert resumed == epoch[2]
