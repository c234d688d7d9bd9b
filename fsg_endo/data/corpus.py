"""The unlabelled corpus of in-domain pretraining: crop windows like the sizing task's, on frames no fold holds.

A masked autoencoder learns from what it is shown, so it is shown what the sizing model will see: square
crops whose side follows the sizing boxes' sides (relative to the frame), at positions inside the endoscope's
field of view, cut and masked by the sizing pipeline's own steps. :func:`frame_table` lists the frames of a
folder (a user's unlabelled frames); :func:`crop_rows` draws the crop boxes and returns manifest-shaped rows
(no size: ``size_mm`` is NaN and nothing reads it).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from fsg_endo.errors import FsgEndoError

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
FRAME_COLUMNS = ("video_id", "frame_id", "frame_path", "width", "height")


def frame_table(root: str | Path) -> pd.DataFrame:
    """Every image under ``root`` (recursively, sorted): video id = its folder, frame id = its stem; the size is
    read from the file. Raises one line naming a file that does not decode, or ``root`` if it holds none."""
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in FRAME_SUFFIXES)
    if not paths:
        raise FsgEndoError(f"{root}: no frames ({', '.join(FRAME_SUFFIXES)}) found for pretraining")
    rows = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise FsgEndoError(f"{path}: not a readable image")
        height, width = image.shape[:2]
        rel = path.relative_to(root)
        video = rel.parent.as_posix() or "."
        rows.append((video, f"{video}/{path.stem}", rel.as_posix(), width, height))
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def video_folds(frames: pd.DataFrame, folds: int, seed: int) -> pd.Series:
    """A fold per frame, whole videos to one fold: the videos in a seeded random order, dealt round-robin."""
    videos = np.sort(frames["video_id"].unique())
    if len(videos) < folds:
        raise FsgEndoError(f"pretraining frames: {len(videos)} video folder(s), fewer than data.folds = {folds}")
    order = np.random.default_rng(seed).permutation(len(videos))
    fold_of = {videos[i]: rank % folds for rank, i in enumerate(order)}
    return frames["video_id"].map(fold_of).astype(int)


def log_uniform_sides(low: float, high: float, seed: int, n: int = 4096) -> np.ndarray:
    """Relative crop sides drawn log-uniformly from [low, high]: the scales for a corpus without boxes."""
    return np.exp(np.random.default_rng(seed).uniform(np.log(low), np.log(high), n))


def relative_sides(rows: pd.DataFrame) -> np.ndarray:
    """Each box's longer side over its frame's shorter side: the scale of the crops the sizing task sees."""
    sides = np.maximum(rows["xmax"] - rows["xmin"], rows["ymax"] - rows["ymin"]).to_numpy(float)
    return sides / np.minimum(rows["width"], rows["height"]).to_numpy(float)


def crop_rows(frames: pd.DataFrame, sides: np.ndarray, crops_per_frame: int, seed: int) -> pd.DataFrame:
    """``crops_per_frame`` square boxes per frame (columns of :data:`FRAME_COLUMNS`).

    Each box's side is a draw from ``sides`` (relative to the frame's shorter side, see :func:`relative_sides`)
    and its centre is uniform over the disc of centres that keep the box inside the field of view (the frame's
    inscribed circle), as the sizing crops of polyps are. Reproducible from ``seed``. Returns manifest-shaped
    rows (``lesion_id`` names the crop) with ``size_mm`` NaN.
    """
    if len(sides) == 0:
        raise FsgEndoError("pretraining crops: no box sides to draw crop scales from")
    rng = np.random.default_rng(seed)
    rows = frames.loc[frames.index.repeat(crops_per_frame)].reset_index(drop=True)
    n = len(rows)
    width, height = rows["width"].to_numpy(float), rows["height"].to_numpy(float)
    short = np.minimum(width, height)
    side = np.clip(rng.choice(np.asarray(sides, float), n) * short, 2.0, short / np.sqrt(2.0))
    reach = np.maximum(short / 2.0 - side / np.sqrt(2.0), 0.0)  # the box's corners stay inside the circle
    radius, angle = reach * np.sqrt(rng.random(n)), 2.0 * np.pi * rng.random(n)
    cx, cy = width / 2.0 + radius * np.cos(angle), height / 2.0 + radius * np.sin(angle)
    xmin, ymin = np.round(cx - side / 2.0), np.round(cy - side / 2.0)
    side = np.round(side)
    crop = rows.groupby("frame_id").cumcount().astype(str)
    return rows.assign(
        lesion_id=rows["frame_id"] + "#" + crop,
        xmin=xmin.astype(int),
        ymin=ymin.astype(int),
        xmax=(xmin + side).astype(int),
        ymax=(ymin + side).astype(int),
        size_mm=np.nan,
    )
