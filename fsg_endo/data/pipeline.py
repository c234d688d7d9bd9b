"""The MONAI data pipeline: manifest rows -> cached uint8 crops -> augmented, normalised training items.

Each item is a dict: ``image`` float32 (3, S, S); ``box`` float32 (4,) = [log(box_w / frame_w),
log(box_h / frame_h), cx / frame_w, cy / frame_h]; ``size_mm``, ``target_reg`` float32; ``size_class3``,
``size_class2`` int64; ``lesion_id``, ``video_id``, ``frame_id`` str.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from monai.transforms import Compose, Randomizable, SelectItemsd
from torch.utils.data import Sampler

from fsg_endo.data.augment import PaperAugmentd
from fsg_endo.data.sizes import scale_size, size_class2, size_class3
from fsg_endo.data.transforms import (
    CropBoxd,
    FovMaskd,
    LoadFramed,
    ResizeImaged,
    ToNormalizedTensor,
)
from fsg_endo.errors import FsgEndoError

OUTPUT_KEYS = (
    "image",
    "box",
    "size_mm",
    "target_reg",
    "size_class3",
    "size_class2",
    "lesion_id",
    "video_id",
    "frame_id",
)
ROW_COLUMNS = (
    "video_id",
    "lesion_id",
    "frame_id",
    "frame_path",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "width",
    "height",
    "size_mm",
)
CACHE_MODES = ("none", "memory", "disk")
_FRAME_INDEX = re.compile(r"(\d+)$")


def box_features(bbox: np.ndarray, frame_size: np.ndarray) -> np.ndarray:
    """(N, 4) boxes in pixels and (N, 2) frame (width, height) -> (N, 4) float32 geometry features.

    Box sides are clamped to one pixel so a degenerate box gives a finite log.
    """
    bbox = np.asarray(bbox, dtype=np.float64)
    frame_size = np.asarray(frame_size, dtype=np.float64)
    wh = np.maximum(bbox[:, 2:] - bbox[:, :2], 1.0)
    centre = (bbox[:, :2] + bbox[:, 2:]) / 2.0
    return np.concatenate([np.log(wh / frame_size), centre / frame_size], axis=1).astype(np.float32)


def frame_index(frame_id: str) -> int:
    """Position of a frame in its video: the trailing integer of the frame id (``001-001_12`` -> 12)."""
    match = _FRAME_INDEX.search(str(frame_id))
    if match is None:
        raise FsgEndoError(f"frame id {frame_id!r} has no trailing frame number to read it from a video")
    return int(match.group(1))


def rows_to_items(
    rows: pd.DataFrame, root: str | Path, source: str = "frames", video: str | Path | None = None
) -> list[dict[str, Any]]:
    """Manifest rows -> plain dicts for the transforms, with targets and box features computed once.

    With ``source="video"`` frames come from ``root/videos/<video_id>.mp4``, or from ``video`` for every row.
    """
    missing = [c for c in ROW_COLUMNS if c not in rows.columns]
    if missing:
        raise FsgEndoError(f"manifest rows lack column(s) {', '.join(missing)}")
    root = Path(root)
    bbox = rows[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=np.float64)
    frame_size = rows[["width", "height"]].to_numpy(dtype=np.int64)
    size_mm = rows["size_mm"].to_numpy(dtype=np.float64)
    boxes, targets = box_features(bbox, frame_size), scale_size(size_mm)
    class3, class2 = np.atleast_1d(size_class3(size_mm)), np.atleast_1d(size_class2(size_mm))
    ids = rows[["video_id", "lesion_id", "frame_id", "frame_path"]].itertuples(index=False)
    items = []
    for i, row in enumerate(ids):
        item = {
            "path": str(root / row.frame_path),
            "bbox": tuple(bbox[i].tolist()),
            "frame_size": tuple(frame_size[i].tolist()),
            "box": boxes[i],
            "size_mm": float(size_mm[i]),
            "target_reg": float(targets[i]),
            "size_class3": int(class3[i]),
            "size_class2": int(class2[i]),
            "lesion_id": str(row.lesion_id),
            "video_id": str(row.video_id),
            "frame_id": str(row.frame_id),
        }
        if source == "video":
            item["video"] = str(video or root / "videos" / f"{row.video_id}.mp4")
            item["frame_index"] = frame_index(row.frame_id)
        items.append(item)
    return items


def crop_transforms(image_size: int = 64, context: float = 0.5, fov_mask: bool = True, source: str = "frames") -> list:
    """The deterministic (cacheable) steps: load, crop with context, FOV mask, resize, drop helper keys."""
    steps = [LoadFramed("image", source=source), CropBoxd("image", context=context)]
    if fov_mask:
        steps.append(FovMaskd("image"))
    return steps + [ResizeImaged("image", size=image_size), SelectItemsd(keys=OUTPUT_KEYS)]


def _find_user_error(err: BaseException) -> FsgEndoError | None:
    """The FsgEndoError that MONAI wrapped (``RuntimeError: applying transform ...``), if any."""
    while err is not None:
        if isinstance(err, FsgEndoError):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise an expected error (missing frame, ...) as itself instead of MONAI's RuntimeError wrapper."""
    try:
        yield
    except RuntimeError as err:
        cause = _find_user_error(err)
        if cause is None:
            raise
        raise cause from None


class _UserErrors:
    """Dataset mixin: an unreadable frame raises FsgEndoError naming its path, not MONAI's wrapper."""

    def __getitem__(self, index):
        with user_errors():
            return super().__getitem__(index)


class FrameDataset(_UserErrors, Dataset):
    """``monai.data.Dataset`` of crops, every step run per access."""


class FrameCacheDataset(_UserErrors, CacheDataset):
    """``monai.data.CacheDataset`` of crops: the uint8 crops are held in memory."""


class FramePersistentDataset(_UserErrors, PersistentDataset):
    """``monai.data.PersistentDataset`` of crops: the uint8 crops are stored on disk."""


def _item_file_hash(item: dict[str, Any]) -> bytes:
    """Disk-cache key of an item: its fields plus the size and mtime of its frame (or video) file."""
    stat = Path(item.get("video", item["path"])).stat()
    payload = pickle.dumps((sorted(item.items(), key=lambda kv: kv[0]), stat.st_size, stat.st_mtime_ns))
    return hashlib.md5(payload).hexdigest().encode()


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise FsgEndoError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def build_dataset(
    rows: pd.DataFrame,
    root: str | Path,
    *,
    image_size: int = 64,
    context: float = 0.5,
    fov_mask: bool = True,
    train: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    source: str = "frames",
    seed: int = 0,
    workers: int = 0,
    video: str | Path | None = None,
    progress: bool = True,
    photometric: bool = True,
) -> Dataset:
    """MONAI dataset of normalised crops of ``rows``; ``train`` adds the paper's augmentation after the cache
    (without its colour jitter and noise when ``photometric`` is False).

    ``cache``: "none" (``Dataset``), "memory" (``CacheDataset``, filled by ``workers`` threads) or "disk"
    (``PersistentDataset`` under ``cache_dir``, one folder per crop setting); ``progress``: MONAI's bar while
    the memory cache fills. ``mean``/``std`` are per channel in [0, 1] units (see :func:`compute_mean_std`);
    None leaves the crop in [0, 1]. ``video``: one video file that every row's frame comes from.
    """
    _check_choice("data cache", cache, CACHE_MODES)
    _check_choice("data source", source, ("frames", "video"))
    steps = crop_transforms(image_size, context, fov_mask, source)
    if train:
        steps.append(PaperAugmentd("image", photometric=photometric, seed=seed))
    transform = Compose(steps + [ToNormalizedTensor(mean, std)]).set_random_state(seed=seed)
    items = rows_to_items(rows, root, source, video)
    if cache == "none":
        return FrameDataset(items, transform)
    if cache == "disk":
        if cache_dir is None:
            raise FsgEndoError("data cache 'disk' needs a cache directory (cache_dir)")
        folder = Path(cache_dir) / f"crop_s{image_size}_c{context:g}_fov{int(fov_mask)}_{source}"
        return FramePersistentDataset(items, transform, cache_dir=folder, hash_func=_item_file_hash)
    with user_errors():
        # copy_cache=False: the steps after the cache build new dicts and arrays, never edit cached ones
        return FrameCacheDataset(items, transform, num_workers=max(workers, 1), copy_cache=False, progress=progress)


def compute_mean_std(
    rows: pd.DataFrame,
    root: str | Path,
    *,
    image_size: int = 64,
    context: float = 0.5,
    fov_mask: bool = True,
    source: str = "frames",
    workers: int = 0,
    max_items: int | None = 2048,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1] units, of the un-augmented crops of (training) ``rows``.

    At most ``max_items`` evenly spaced rows are read (None: all), enough for stable statistics.
    """
    _check_choice("data source", source, ("frames", "video"))
    if len(rows) == 0:
        raise FsgEndoError("cannot compute crop mean/std: no training rows")
    if max_items is not None and len(rows) > max_items:
        rows = rows.iloc[np.linspace(0, len(rows) - 1, max_items).round().astype(int)]
    crop = Compose(crop_transforms(image_size, context, fov_mask, source))

    def moments(item: dict[str, Any]) -> np.ndarray:
        pixels = crop(item)["image"].reshape(-1, 3).astype(np.float64) / 255.0
        return np.concatenate([pixels.sum(0), (pixels**2).sum(0), [len(pixels)]])

    items = rows_to_items(rows, root, source)
    with user_errors(), ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        total = np.sum(list(pool.map(moments, items)), axis=0)
    mean = total[:3] / total[6]
    std = np.sqrt(np.maximum(total[3:6] / total[6] - mean**2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def seed_augmentation(dataset: Dataset, seed: int) -> None:
    """Reseed the dataset's random steps with ``seed`` itself, for per-item seeding: cheaper than
    ``dataset.transform.set_random_state``, which first builds a RandomState for the Compose."""
    for step in dataset.transform.transforms:
        if isinstance(step, Randomizable):
            step.set_random_state(seed=seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker start: MONAI reseeds the dataset's random transforms; numpy and random follow.

    (OpenCV's thread count is left alone: ``cv2.setNumThreads`` in a forked worker deadlocks.)
    """
    monai_worker_init_fn(worker_id)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    sampler: Sampler | None = None,
    shuffle: bool = False,
    workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """MONAI DataLoader with a seeded generator and per-worker seeding: the same seed gives the same batches."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=seed_worker,
        persistent_workers=workers > 0,
        drop_last=drop_last,
    )
