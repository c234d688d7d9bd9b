"""MONAI dictionary transforms of the crop pipeline: load a frame, crop around the box, mask, resize, augment.

Items are dicts built once from manifest rows (see :mod:`fsg_endo.data.pipeline`). The deterministic steps
end with a small uint8 HWC crop that MONAI can cache; the random and float steps run after the cache.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED

from fsg_endo.errors import FsgEndoError


def read_frame(path: str) -> np.ndarray:
    """Decode a JPEG (or any image OpenCV reads) as RGB uint8 HWC; FsgEndoError names the path on failure."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        problem = "not a decodable image" if Path(path).is_file() else "file missing"
        raise FsgEndoError(f"cannot read frame {path}: {problem}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class _OpenVideo:
    """One capture and where it stands: the index its next read returns, and the last frame decoded."""

    def __init__(self, capture: cv2.VideoCapture) -> None:
        self.capture, self.last = capture, None
        self.next_index: int | None = 0  # None: position unknown, the next read seeks


class VideoFrameReader:
    """Frames of .mp4 files by index, keeping one open capture per video per thread and process (LRU).

    Captures are never shared across threads (CacheDataset fills its cache with a thread pool) nor
    inherited across a fork (DataLoader workers open their own). Reading forward by up to ``max_skip``
    frames decodes through instead of seeking; the same frame twice (two lesions) is decoded once.
    """

    def __init__(self, max_open: int = 8, max_skip: int = 32) -> None:
        self.max_open, self.max_skip = max_open, max_skip
        self._local = threading.local()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open, "max_skip": self.max_skip}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(**state)

    def _videos(self) -> OrderedDict:
        if self._pid != os.getpid():  # forked: the parent's captures share its file offsets
            self._local, self._pid = threading.local(), os.getpid()
        if not hasattr(self._local, "videos"):
            self._local.videos = OrderedDict()
        return self._local.videos

    def _open(self, path: str) -> _OpenVideo:
        videos = self._videos()
        if path in videos:
            videos.move_to_end(path)
            return videos[path]
        if not Path(path).is_file():
            raise FsgEndoError(f"cannot read video {path}: file missing")
        capture = cv2.VideoCapture(path)
        if not capture.isOpened():
            raise FsgEndoError(f"cannot read video {path}: not a decodable video")
        if len(videos) >= self.max_open:
            videos.popitem(last=False)[1].capture.release()
        videos[path] = _OpenVideo(capture)
        return videos[path]

    def read(self, path: str, index: int) -> np.ndarray:
        """Frame ``index`` (0-based) of the video at ``path`` as RGB uint8 HWC."""
        video = self._open(path)
        if video.last is not None and index == video.next_index - 1:
            return video.last
        gap = None if video.next_index is None else index - video.next_index
        if gap is not None and 0 <= gap <= self.max_skip:
            for _ in range(gap):
                video.capture.grab()
        else:
            video.capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, image = video.capture.read()
        if not ok:
            video.next_index, video.last = None, None
            raise FsgEndoError(f"cannot read frame {index} of video {path}: beyond its end or not decodable")
        video.next_index, video.last = index + 1, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return video.last


class LoadFramed(MapTransform):
    """Load the item's frame into ``image``: from ``path`` (JPEG) or, with ``source="video"``, from
    ``video`` at ``frame_index``. Checks the frame against the manifest's ``frame_size`` (width, height)."""

    def __init__(self, keys: str | Sequence[Hashable] = "image", source: str = "frames") -> None:
        super().__init__(keys)
        if source not in ("frames", "video"):
            raise FsgEndoError(f"data source must be 'frames' or 'video', not {source!r}")
        self.source = source
        self.videos = VideoFrameReader() if source == "video" else None

    def _load(self, d: Mapping[str, Any]) -> tuple[np.ndarray, str]:
        if self.videos is None:
            return read_frame(d["path"]), d["path"]
        where = f"{d['video']} frame {d['frame_index']}"
        return self.videos.read(d["video"], d["frame_index"]), where

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image, where = self._load(d)
        width, height = d["frame_size"]
        if image.shape[:2] != (height, width):
            raise FsgEndoError(
                f"{where}: frame is {image.shape[1]}x{image.shape[0]} but the manifest says {width}x{height}"
            )
        for key in self.keys:
            d[key] = image
        return d


def crop_window(bbox: Sequence[float], context: float) -> tuple[int, int, int]:
    """Square ``(x0, y0, side)`` centred on the box, side = max(box w, h) * (1 + 2 * context) in pixels."""
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    side = max(1, round(max(xmax - xmin, ymax - ymin) * (1.0 + 2.0 * context)))
    x0 = math.floor((xmin + xmax) / 2.0 - side / 2.0 + 0.5)
    y0 = math.floor((ymin + ymax) / 2.0 - side / 2.0 + 0.5)
    return x0, y0, side


def crop_square(image: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """The ``side``-pixel square at (x0, y0) of an HWC image, zero (black) where it leaves the image."""
    height, width = image.shape[:2]
    out = np.zeros((side, side) + image.shape[2:], dtype=image.dtype)
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + side, width), min(y0 + side, height)
    if fx1 > fx0 and fy1 > fy0:
        out[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0] = image[fy0:fy1, fx0:fx1]
    return out


def fov_mask(frame_size: Sequence[int], x0: int, y0: int, side: int) -> np.ndarray:
    """Boolean (side, side) mask of the crop's pixels inside the frame's inscribed circle (the endoscope FOV)."""
    width, height = frame_size
    radius = min(width, height) / 2.0
    dx = (x0 + np.arange(side) + 0.5 - width / 2.0) ** 2
    dy = (y0 + np.arange(side) + 0.5 - height / 2.0) ** 2
    return dy[:, None] + dx[None, :] <= radius * radius


class CropBoxd(MapTransform):
    """Replace ``image`` by the square around ``bbox`` with a context margin; records ``crop_window``."""

    def __init__(self, keys: str | Sequence[Hashable] = "image", context: float = 0.5) -> None:
        super().__init__(keys)
        if context < 0:
            raise FsgEndoError(f"crop context must be >= 0, not {context}")
        self.context = context

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d["crop_window"] = crop_window(d["bbox"], self.context)
        for key in self.key_iterator(d):
            d[key] = crop_square(d[key], *d["crop_window"])
        return d


class FovMaskd(MapTransform):
    """Zero the crop's pixels outside the frame's inscribed circle, mapped through ``crop_window``."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        inside = fov_mask(d["frame_size"], *d["crop_window"])
        for key in self.key_iterator(d):
            d[key] = d[key] * inside[..., None].astype(d[key].dtype)
        return d


class ResizeImaged(MapTransform):
    """Resize HWC images to ``size`` x ``size`` with OpenCV's area interpolation (anti-aliased shrink)."""

    def __init__(self, keys: str | Sequence[Hashable] = "image", size: int = 64) -> None:
        super().__init__(keys)
        self.size = size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = cv2.resize(d[key], (self.size, self.size), interpolation=cv2.INTER_AREA)
        return d


class ToNormalizedTensor:
    """Last step: uint8 HWC crop -> float32 CHW tensor, ``(x / 255 - mean) / std``; other fields to tensors.

    Deliberately not a MONAI ``Transform``: CacheDataset caches up to the first random or non-MONAI step,
    so the cache keeps the uint8 crop (4x smaller than float32) even when nothing random comes before.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        mean = np.zeros(3) if mean is None else np.asarray(mean, dtype=np.float64)
        std = np.ones(3) if std is None else np.asarray(std, dtype=np.float64)
        if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
            raise FsgEndoError(f"normalisation needs 3 means and 3 positive stds, got mean={mean}, std={std}")
        self.scale = torch.tensor(1.0 / (255.0 * std), dtype=torch.float32)[:, None, None]
        self.offset = torch.tensor(-mean / std, dtype=torch.float32)[:, None, None]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        hwc = torch.as_tensor(np.ascontiguousarray(d["image"]))
        chw = torch.empty(hwc.shape[2], hwc.shape[0], hwc.shape[1]).copy_(hwc.permute(2, 0, 1))
        d["image"] = chw.mul_(self.scale).add_(self.offset)
        d["box"] = torch.as_tensor(d["box"], dtype=torch.float32)
        for key in ("size_mm", "target_reg"):
            d[key] = torch.tensor(float(d[key]), dtype=torch.float32)
        for key in ("size_class3", "size_class2"):
            d[key] = torch.tensor(int(d[key]), dtype=torch.int64)
        return d


class NormalizeImaged(MapTransform):
    """uint8 CHW image -> float32 ``(x / 255 - mean) / std`` per channel (the image_class items)."""

    def __init__(self, keys: str | Sequence[Hashable], mean: Sequence[float], std: Sequence[float]) -> None:
        MapTransform.__init__(self, keys)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.scale = 255.0 * torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key]).float().div_(self.scale).sub_(self.mean / self.scale * 255.0)
        return d


class ShiftFlipd(Randomizable, MapTransform):
    """Random translation by up to ``shift`` pixels (edges replicated) and, with ``flip``, a left-right mirror
    with probability 1/2, of a CHW tensor; torch ops, as MONAI's pad + crop cost ~10x more per small image."""

    def __init__(self, keys: str | Sequence[Hashable], shift: int = 0, flip: bool = False) -> None:
        MapTransform.__init__(self, keys)
        self.shift, self.flip = shift, flip
        self.set_random_state(seed=0)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ShiftFlipd:
        """A numpy Generator from ``seed`` (or a draw of ``state``): cheaper than a RandomState, reseeded per item."""
        if seed is None:
            seed = int((state if state is not None else np.random.RandomState()).randint(MAX_SEED))
        self.rng = np.random.default_rng(seed)
        return self

    def randomize(self, data: Any = None) -> None:
        self.dy, self.dx = self.rng.integers(0, 2 * self.shift + 1, size=2)
        self.mirror = self.flip and self.rng.random() < 0.5

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.shift:
                size_y, size_x = image.shape[-2:]
                padded = torch.nn.functional.pad(image[None], (self.shift,) * 4, mode="replicate")[0]
                image = padded[:, self.dy : self.dy + size_y, self.dx : self.dx + size_x]
            d[key] = image.flip(-1) if self.mirror else image
        return d
