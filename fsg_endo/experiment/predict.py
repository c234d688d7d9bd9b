"""``fsg-endo predict``: polyp sizes of boxes drawn on a new video or frames folder, by a logged model.

The boxes CSV has ``frame_index`` (with ``--video``) or ``frame_path`` (relative to ``--frames``), ``xmin,
ymin, xmax, ymax`` in pixels and optionally ``lesion_id``. Every input is checked before the model runs,
and the output is written only when every box was sized: a bad input is one error line and no file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from fsg_endo.data.manifest import leaves_root
from fsg_endo.data.readers import check_box, read_csv_strings
from fsg_endo.engine.inference import size_rows
from fsg_endo.errors import FsgEndoError
from fsg_endo.io import atomic_path
from fsg_endo.tracking.model_store import load_model
from fsg_endo.tracking.tracker import resolve_tracking_uri

BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class Prediction:
    """The sized boxes (input columns + ``size_mm, size_class3, size_class2``) and, with lesion ids, lesions."""

    boxes: pd.DataFrame
    lesions: pd.DataFrame | None
    written: list[Path]


def _where(path: Path, i: int) -> str:
    return f"{path}: row {i + 1} (line {i + 2})"


def read_boxes(path: Path, frame_column: str) -> pd.DataFrame:
    """The boxes CSV with numeric coordinates (and integer ``frame_index``), refusing what does not parse."""
    table = read_csv_strings(path, "boxes CSV", skipinitialspace=True, keep_default_na=False)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in (frame_column, *BOX_COLUMNS) if c not in table.columns]
    if missing:
        raise FsgEndoError(f"{path}: boxes CSV lacks column(s) {', '.join(missing)}")
    if table.empty:
        raise FsgEndoError(f"{path}: boxes CSV has no rows")
    numeric = [*BOX_COLUMNS] + ([frame_column] if frame_column == "frame_index" else [])
    for col in numeric:
        values = pd.to_numeric(table[col].str.strip(), errors="coerce").astype(float)
        bad = ~np.isfinite(values) | ((values % 1 != 0) | (values < 0) if col == "frame_index" else False)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            kind = "a frame number (integer >= 0)" if col == "frame_index" else "a number"
            raise FsgEndoError(f"{_where(path, i)}: {col} {table[col].iloc[i]!r} is not {kind}")
        table[col] = values.astype(np.int64) if (values % 1 == 0).all() else values
    for col in [c for c in (frame_column, "lesion_id") if c in table.columns and table[c].dtype == object]:
        empty = table[col].str.strip() == ""
        if empty.any():
            raise FsgEndoError(f"{_where(path, int(np.flatnonzero(empty.to_numpy())[0]))}: empty {col}")
    return table


def video_size(video: Path) -> tuple[int, int, int]:
    """(width, height, frame count) of a video, or one error line when it is missing or not decodable."""
    if not video.is_file():
        raise FsgEndoError(f"cannot read video {video}: file missing")
    capture = cv2.VideoCapture(str(video))
    try:
        ok, _ = capture.read()
        if not capture.isOpened() or not ok:
            raise FsgEndoError(f"cannot read video {video}: not a decodable video")
        return (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
        )
    finally:
        capture.release()


def frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of a frame image, read from its header."""
    if not path.is_file():
        raise FsgEndoError(f"cannot read frame {path}: file missing")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError):
        raise FsgEndoError(f"cannot read frame {path}: not a decodable image") from None


def box_rows(boxes: pd.DataFrame, path: Path, video: Path | None, frames: Path | None) -> pd.DataFrame:
    """Pipeline rows of the boxes: frame ids and sizes looked up, every box checked against its frame."""
    rows = pd.DataFrame({c: boxes[c] for c in BOX_COLUMNS})
    rows["lesion_id"] = boxes["lesion_id"] if "lesion_id" in boxes else [f"box{i}" for i in range(len(boxes))]
    if video is not None:
        width, height, count = video_size(video)
        late = boxes["frame_index"] >= count
        if late.any():
            i = int(np.flatnonzero(late.to_numpy())[0])
            raise FsgEndoError(
                f"{_where(path, i)}: frame_index {boxes['frame_index'].iloc[i]} is beyond the {count} frames of {video}"
            )
        rows["video_id"], rows["frame_path"] = video.stem, ""
        rows["frame_id"] = [f"{video.stem}_{i}" for i in boxes["frame_index"]]  # the index read from the video
        rows["width"], rows["height"] = width, height
    else:
        for i, rel in enumerate(boxes["frame_path"]):
            if leaves_root(rel):
                raise FsgEndoError(f"{_where(path, i)}: frame_path {rel!r} leaves the frames folder {frames}")
        sizes = {rel: frame_size(frames / rel) for rel in dict.fromkeys(boxes["frame_path"])}
        rows["video_id"], rows["frame_path"] = frames.name, boxes["frame_path"]
        rows["frame_id"] = [Path(rel).stem for rel in boxes["frame_path"]]
        rows["width"] = [sizes[rel][0] for rel in boxes["frame_path"]]
        rows["height"] = [sizes[rel][1] for rel in boxes["frame_path"]]
    for i, row in enumerate(rows.itertuples(index=False)):
        check_box((row.xmin, row.ymin, row.xmax, row.ymax), row.width, row.height, _where(path, i))
    rows["size_mm"] = np.nan  # unknown: what the model predicts
    return rows


def predict_sizes(
    model_uri: str,
    boxes_csv: str,
    out: str,
    video: str | None = None,
    frames: str | None = None,
    tracking_uri: str | None = None,
) -> Prediction:
    """Size every box of ``boxes_csv`` with the model at ``model_uri``; write ``out`` (and, with lesion ids,
    ``<out stem>_lesions.csv``) only once all succeeded."""
    if (video is None) == (frames is None):
        raise FsgEndoError("give exactly one of --video FILE and --frames DIR")
    path, out = Path(boxes_csv), Path(out)
    if frames is not None and not Path(frames).is_dir():
        raise FsgEndoError(f"{frames}: frames folder not found")
    boxes = read_boxes(path, "frame_index" if video is not None else "frame_path")
    rows = box_rows(boxes, path, Path(video) if video else None, Path(frames) if frames else None)
    model = load_model(model_uri, resolve_tracking_uri(tracking_uri))
    per_box, per_lesion = size_rows(model, rows, frames or ".", "video" if video else "frames", video)
    sized = pd.concat([boxes.reset_index(drop=True), per_box.reset_index(drop=True)], axis=1)
    lesions = per_lesion if "lesion_id" in boxes else None
    targets = [(out, sized)] + ([(out.with_name(f"{out.stem}_lesions.csv"), lesions)] if lesions is not None else [])
    with contextlib.ExitStack() as stack:
        for target, table in targets:
            table.to_csv(stack.enter_context(atomic_path(target)), index=False)
    return Prediction(sized, lesions, [target for target, _ in targets])
