"""Image-classification sources of the ``image_class`` task: MNIST (or scikit-learn's digits), Imagenette; CIFAR-100
in :mod:`fsg_endo.data.cifar100`.

Every reader returns an :class:`ImageData` held in memory as uint8 (N, 3, S, S) tensors, resized once;
:func:`image_dataset` serves a split as MONAI dict items. Nothing is downloaded: a missing dataset is
either replaced by an explicit fallback (MNIST -> scikit-learn's bundled digits) or one clear error line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from fsg_endo.errors import FsgEndoError

__all__ = [
    "finish_sets",
    "folder_classes",
    "ImageData",
    "ImageSet",
    "channel_stats",
    "image_dataset",
    "load_digits",
    "load_image_folder",
    "load_mnist",
    "stratified_subset",
    "validation_split",
]

IMAGENETTE_NAMES = {  # the ten WordNet ids of Imagenette and their readable names
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888605": "parachute",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DIGIT_NAMES = tuple(str(d) for d in range(10))


@dataclass
class ImageSet:
    """One split: uint8 images (N, 3, S, S), int64 labels (N,) and an identifier per image."""

    images: Tensor
    labels: Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], [self.ids[i] for i in index])

    @classmethod
    def empty(cls, image_size: int) -> ImageSet:
        """A split with no images (the train split when only the held-out one is read)."""
        return cls(torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), [])


@dataclass
class ImageData:
    """Train and held-out splits of one source; ``source`` says what was actually read (e.g. ``sklearn_digits``)."""

    train: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]
    source: str
    note: str = ""  # a line for the user, e.g. why a fallback was used


def stratified_subset(labels: Tensor | np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified random subset of size ``n`` (all indices when ``n`` is None or too big)."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    try:
        keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    except ValueError:  # a class too small to stratify (tiny test sets): plain random subset
        keep = np.random.default_rng(seed).choice(len(labels), size=n, replace=False)
    return np.sort(keep)


def _limit(split: ImageSet, fraction: float, limit: int | None, seed: int) -> ImageSet:
    """At most ``min(round(fraction * N), limit)`` images of ``split``, stratified by class."""
    if not len(split):
        return split
    n = max(1, round(fraction * len(split)))
    n = n if limit is None else min(n, limit)
    return split.subset(stratified_subset(split.labels, n, seed))


def to_rgb_size(images: Tensor, size: int) -> Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} -> uint8 (N, 3, size, size); antialiased bilinear resizing."""
    if images.shape[-2:] != (size, size):
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def finish_sets(
    train: ImageSet,
    test: ImageSet,
    names: tuple[str, ...],
    source: str,
    note: str,
    fraction: float,
    train_limit: int | None,
    test_limit: int | None,
    seed: int,
) -> ImageData:
    return ImageData(
        _limit(train, fraction, train_limit, seed), _limit(test, 1.0, test_limit, seed), names, source, note
    )


def load_digits(
    image_size: int = 28,
    seed: int = 0,
    fraction: float = 1.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    train: bool = True,
    note: str = "",
) -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), upsampled; 20 % held out, stratified."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=seed)
    full = ImageSet(to_rgb_size(images, image_size), labels, [f"digits_{i:04d}" for i in range(len(labels))])
    train_set = full.subset(np.sort(train_idx)) if train else ImageSet.empty(image_size)
    return finish_sets(
        train_set,
        full.subset(np.sort(test_idx)),
        DIGIT_NAMES,
        "sklearn_digits",
        note,
        fraction,
        train_limit,
        test_limit,
        seed,
    )


def _mnist_files(root: Path) -> list[Path]:
    """The four raw idx files torchvision's MNIST reads under ``root``."""
    from torchvision.datasets import MNIST

    return [root / "MNIST" / "raw" / name.removesuffix(".gz") for name, _ in MNIST.resources]


def _mnist_split(root: Path, train: bool, image_size: int) -> ImageSet:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(str(root), train=train, download=False)
    except Exception as err:  # torchvision asserts on malformed idx headers, torch raises on bad sizes
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FsgEndoError(f"{root / 'MNIST' / 'raw'}: malformed MNIST idx files ({detail})") from None
    prefix = "train" if train else "test"
    return ImageSet(
        to_rgb_size(ds.data[:, None], image_size),
        ds.targets.to(torch.int64),
        [f"mnist_{prefix}_{i:05d}" for i in range(len(ds.targets))],
    )


def load_mnist(
    root: str | os.PathLike | None,
    image_size: int = 28,
    seed: int = 0,
    fraction: float = 1.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    train: bool = True,
) -> ImageData:
    """torchvision's on-disk MNIST under ``root`` (``MNIST/raw/*-ubyte``); else scikit-learn's digits, said so.

    ``train=False`` reads the held-out split only (inference); the train split is then empty.
    """
    if root is not None and all(p.is_file() for p in _mnist_files(Path(root))):
        test = _mnist_split(Path(root), False, image_size)
        train_set = _mnist_split(Path(root), True, image_size) if train else ImageSet.empty(image_size)
        return finish_sets(train_set, test, DIGIT_NAMES, "mnist", "", fraction, train_limit, test_limit, seed)
    where = Path(root or ".") / "MNIST" / "raw"
    note = (
        f"MNIST not found ({where}/*-ubyte); using scikit-learn's bundled 8x8 digits upsampled to "
        f"{image_size} px instead (source: sklearn_digits)"
    )
    return load_digits(image_size, seed, fraction, train_limit, test_limit, train, note)


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image(path: Path, size: int) -> Tensor:
    """One image file as uint8 (3, size, size): shorter side resized to ``size``, then centre-cropped."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise FsgEndoError(f"{path}: unreadable image ({str(err).splitlines()[0] if str(err) else err})") from None
    image = TF.resize(image, size, antialias=True)
    return TF.center_crop(image, [size, size])


def _folder_index(split_dir: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """Image files of an ImageFolder split and their class indices (classes in ``classes`` order)."""
    files, labels = [], []
    for k, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [k] * len(found)
    if not files:
        raise FsgEndoError(f"{split_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return files, np.asarray(labels, dtype=np.int64)


def _load_folder_split(
    root: Path, split: str, classes: list[str], size: int, fraction: float, limit: int | None, seed: int
) -> ImageSet:
    """Choose the subset from the file list first, then decode only the chosen images."""
    files, labels = _folder_index(root / split, classes)
    n = max(1, round(fraction * len(files)))
    keep = stratified_subset(labels, n if limit is None else min(n, limit), seed)
    images = torch.stack([_read_image(files[i], size) for i in keep])
    ids = [str(files[i].relative_to(root)) for i in keep]
    return ImageSet(images, torch.from_numpy(labels[keep]), ids)


def folder_classes(root: Path) -> list[str]:
    """The class folder names of an ImageFolder root, the same under ``train/`` and ``val/``."""
    hint = (
        "put the imagenette2-160 folder there (train/ and val/, one sub-folder of images per class, "
        "from imagenette2-160.tgz)"
    )
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FsgEndoError(f"{root}: no ImageFolder dataset (train/ and val/ missing): {hint}")
    classes = [p.name for p in _class_folders(root / "train")]
    val_classes = [p.name for p in _class_folders(root / "val")]
    if not classes:
        raise FsgEndoError(f"{root / 'train'}: no class folders: {hint}")
    if val_classes != classes:
        raise FsgEndoError(f"{root / 'val'}: class folders {val_classes} differ from train/ {classes}")
    return classes


def load_image_folder(
    root: str | os.PathLike,
    image_size: int = 64,
    seed: int = 0,
    fraction: float = 1.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    train: bool = True,
    source: str = "imagenette",
) -> ImageData:
    """An ImageFolder root with ``train/`` and ``val/`` (one folder per class), e.g. ``imagenette2-160``.

    ``val/`` is the held-out split; ``train=False`` decodes only that one.
    """
    root = Path(root)
    classes = folder_classes(root)
    train_set = (
        _load_folder_split(root, "train", classes, image_size, fraction, train_limit, seed)
        if train
        else ImageSet.empty(image_size)
    )
    test = _load_folder_split(root, "val", classes, image_size, 1.0, test_limit, seed)
    return ImageData(train_set, test, tuple(IMAGENETTE_NAMES.get(c, c) for c in classes), source)


def validation_split(split: ImageSet, folds: int, fold: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(rest, fold ``fold`` of ``folds`` class-stratified folds): the validation images come out of training."""
    from sklearn.model_selection import KFold, StratifiedKFold

    index = np.arange(len(split))
    try:
        parts = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(index, split.labels.numpy()))
    except ValueError:  # every class smaller than the number of folds (tiny test sets): unstratified folds
        parts = list(KFold(folds, shuffle=True, random_state=seed).split(index))
    train, val = parts[fold]
    return split.subset(np.sort(train)), split.subset(np.sort(val))


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of 0-1 pixel values) of uint8 (N, 3, S, S) images."""
    x = images.float().div_(255.0)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def image_dataset(split: ImageSet, mean: Sequence[float], std: Sequence[float], shift: int = 0, flip: bool = False):
    """A MONAI dataset of ``{"image", "label", "image_id"}`` items: normalised ``(x / 255 - mean) / std``, then
    (training) shifted up to ``shift`` pixels and mirrored left-right (``flip``) at random."""
    from monai.data import Dataset
    from monai.transforms import Compose

    from fsg_endo.data.transforms import NormalizeImaged, ShiftFlipd

    steps = [NormalizeImaged("image", mean, std)]
    if shift > 0 or flip:
        steps.append(ShiftFlipd("image", shift, flip))
    items = [
        {"image": image, "label": int(label), "image_id": image_id}
        for image, label, image_id in zip(split.images, split.labels, split.ids)
    ]
    return Dataset(items, Compose(steps))
