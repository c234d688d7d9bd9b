"""Image datasets written by hand in the layouts the image_class readers expect (MNIST, ImageFolder, CIFAR-100)."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np

from fsg_endo.data.image_folders import IMAGENETTE_NAMES

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # RGB of the tiny ImageFolder classes


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header: 0, 0, type 0x08 = uint8, number of dims; then the dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision's raw MNIST layout with random 28x28 images; returns what was written."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[f"{prefix}_images"], out[f"{prefix}_labels"] = images, labels
    return out


def write_image_folder(root: Path, per_class: tuple[int, int] = (8, 4), size: int = 40) -> list[str]:
    """train/ and val/ with one folder per class (Imagenette ids), solid-colour PNGs; returns the class ids."""
    wnids = sorted(IMAGENETTE_NAMES)[:3]
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for wnid, rgb in zip(wnids, COLOURS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                height = size + int(rng.integers(0, 20))  # non-square, as in imagenette2-160
                image = np.zeros((height, size, 3), np.uint8) + np.array(rgb[::-1], np.uint8)  # BGR for OpenCV
                cv2.imwrite(str(folder / f"{wnid}_{i}.png"), image)
    return wnids


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 30, n_classes: int = 100) -> dict[str, np.ndarray]:
    """torchvision's cifar-100-python/{train,test,meta} pickles; returns the data written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [i % 4 for i in range(n)]  # 4 of the 100 classes appear
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": name,
            "fine_labels": labels,
            "coarse_labels": [0] * n,
            "data": data,
        }
        (folder / name).write_bytes(pickle.dumps(entry))
        out[f"{name}_data"], out[f"{name}_labels"] = data, np.array(labels)
    meta = {"fine_label_names": [f"class_{k:03d}" for k in range(n_classes)], "coarse_label_names": ["all"]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return out
