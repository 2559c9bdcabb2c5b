"""Tiny datasets in each public dataset's exact on-disk layout (names, extensions, mask naming)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_image(path: Path, size=(40, 48), value: int | None = None, channels: int = 3, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (*size, channels) if channels > 1 else size
    img = rng.integers(0, 255, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def write_mask(path: Path, size=(40, 48), box=(5, 5, 20, 20), value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = value
    assert cv2.imwrite(str(path), mask)
    return path


def make_mvtec(root: Path, category: str = "bottle", n_train: int = 10, ext: str = ".png") -> Path:
    base = root / category
    for i in range(n_train):
        write_image(base / "train" / "good" / f"{i:03d}{ext}", seed=i)
    for i in range(2):
        write_image(base / "test" / "good" / f"{i:03d}{ext}", seed=100 + i)
    for defect in ("broken_large", "contamination"):
        for i in range(2):
            write_image(base / "test" / defect / f"{i:03d}{ext}", seed=200 + i)
            write_mask(base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def make_btad(root: Path, category: str = "01", ext: str = ".bmp", mask_ext: str = ".png", n_train: int = 10) -> Path:
    base = root / category
    for i in range(n_train):
        write_image(base / "train" / "ok" / f"{i:04d}{ext}", seed=i)
    for i in range(2):
        write_image(base / "test" / "ok" / f"{i:04d}{ext}", seed=100 + i)
        write_image(base / "test" / "ko" / f"{i:04d}{ext}", seed=200 + i)
        write_mask(base / "ground_truth" / "ko" / f"{i:04d}{mask_ext}")
    return root


def make_visa(root: Path, category: str = "candle", n_train: int = 10) -> Path:
    base = root / category / "Data"
    lines = ["object,split,label,image,mask"]
    anno = ["image,label,mask"]
    for i in range(n_train):
        write_image(base / "Images" / "Normal" / f"{i:04d}.JPG", seed=i)
        lines.append(f"{category},train,normal,{category}/Data/Images/Normal/{i:04d}.JPG,")
    for i in range(n_train, n_train + 2):
        write_image(base / "Images" / "Normal" / f"{i:04d}.JPG", seed=i)
        lines.append(f"{category},test,normal,{category}/Data/Images/Normal/{i:04d}.JPG,")
    for i, label in enumerate(["damaged corner of packaging", "wax melded out of the candle"]):
        write_image(base / "Images" / "Anomaly" / f"{i:03d}.JPG", seed=300 + i)
        write_mask(base / "Masks" / "Anomaly" / f"{i:03d}.png", value=i + 1)  # VisA masks hold class indices
        lines.append(f"{category},test,anomaly,{category}/Data/Images/Anomaly/{i:03d}.JPG,{category}/Data/Masks/Anomaly/{i:03d}.png")
        anno.append(f"{category}/Data/Images/Anomaly/{i:03d}.JPG,\"{label}\",{category}/Data/Masks/Anomaly/{i:03d}.png")
    lines.append("other,train,normal,other/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    (root / category / "image_anno.csv").write_text("\n".join(anno) + "\n")
    return root


def make_folder(root: Path, category: str = "bracket", n_train: int = 10) -> Path:
    base = root / category
    for i in range(n_train):
        write_image(base / "train" / "good" / f"img_{i}.jpg", seed=i)
    write_image(base / "test" / "good" / "ok_1.jpg", seed=50)
    write_image(base / "test" / "dent" / "d1.jpg", seed=60)
    write_image(base / "test" / "dent" / "d2.jpg", seed=61)
    write_mask(base / "masks" / "dent" / "d1.png")
    write_mask(base / "masks" / "dent" / "d2_mask.png")
    return root


def tiny_widget_project(tmp: Path) -> Path:
    """A tiny demo (64 px, 8 train images) and a params.yaml for 3-iteration widget runs; returns the params file."""
    import yaml

    from urd.data.demo import DemoSpec, generate_demo

    generate_demo(tmp / "demo", DemoSpec(size=64, train=8, test_good=3, test_per_defect=2))
    params = {
        "dataset": {"root": str(tmp / "demo"), "image_size": 64, "val_fraction": 0.25, "min_train_images": 2},
        "model": {"backbone": "resnet18", "weights": "none"},  # small, and the random-backbone path and its warnings
        "train": {"iterations": 3, "batch_size": 2, "checkpoint_every": 3, "log_every": 1, "num_workers": 0},
        "synthesis": {"foreground": {"widget": "otsu"}},
        "evaluate": {"gallery_size": 2},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp / "params.yaml"
