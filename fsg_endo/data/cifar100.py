"""CIFAR-100 for the ``image_class`` task: torchvision's on-disk python-format files, read without downloading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from fsg_endo.data.image_folders import ImageData, ImageSet, finish_sets, to_rgb_size
from fsg_endo.errors import FsgEndoError

__all__ = ["cifar_folder", "load_cifar100"]


def cifar_folder(root: Path) -> Path:
    """The ``cifar-100-python`` folder under (or at) ``root``."""
    for folder in (root / "cifar-100-python", root):
        if all((folder / name).is_file() for name in ("train", "test", "meta")):
            return folder
    raise FsgEndoError(
        f"{root}: no CIFAR-100 data: put torchvision's cifar-100-python folder (files train, test "
        f"and meta, from cifar-100-python.tar.gz) at {root / 'cifar-100-python'}"
    )


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict:
    """A CIFAR python-format file (a pickled dict, read as torchvision does) with ``keys`` checked."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as err:  # unpickling raises many types for a foreign or truncated file
        raise FsgEndoError(f"{path}: not a CIFAR python-format file ({type(err).__name__}: {err})") from None
    missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise FsgEndoError(f"{path}: not a CIFAR-100 file (missing {', '.join(missing)})")
    return entry


def _cifar_split(path: Path, name: str) -> ImageSet:
    entry = _unpickle(path, ("data", "fine_labels"))
    data = np.asarray(entry["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(entry["fine_labels"]):
        raise FsgEndoError(f"{path}: expected data of shape (N, 3072) with N labels, got {data.shape}")
    return ImageSet(
        torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()),
        torch.as_tensor(entry["fine_labels"], dtype=torch.int64),
        [f"cifar100_{name}_{i:05d}" for i in range(len(data))],
    )


def load_cifar100(
    root: str | os.PathLike,
    image_size: int = 32,
    seed: int = 0,
    fraction: float = 1.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    train: bool = True,
) -> ImageData:
    """torchvision's on-disk CIFAR-100 (``ROOT/cifar-100-python/{train,test,meta}``), fine labels.

    ``train=False`` reads the held-out (test) file only.
    """
    folder = cifar_folder(Path(root))
    names = tuple(_unpickle(folder / "meta", ("fine_label_names",))["fine_label_names"])
    train_set = _cifar_split(folder / "train", "train") if train else ImageSet.empty(image_size)
    test = _cifar_split(folder / "test", "test")
    for split, path in ((train_set, "train"), (test, "test")):
        if len(split) and int(split.labels.max()) >= len(names):
            raise FsgEndoError(
                f"{folder / path}: label {int(split.labels.max())} has no name in meta ({len(names)} fine_label_names)"
            )
    data = finish_sets(train_set, test, names, "cifar100", "", fraction, train_limit, test_limit, seed)
    for split in (data.train, data.test):  # resize only the images kept
        split.images = to_rgb_size(split.images, image_size)
    return data
