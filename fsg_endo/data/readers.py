"""The REAL-Colon reader, and what every reader shares (docs/interfaces.md#data-layouts): a row per lesion box per
frame. The SUN reader is :mod:`fsg_endo.data.sun`.

Both return the manifest columns except ``fold`` (see :mod:`fsg_endo.data.manifest`). Every expected
problem of the input raises :class:`FsgEndoError` with one line naming the file and the problem.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import pandas as pd

from fsg_endo.data.sizes import size_class2, size_class3
from fsg_endo.errors import FsgEndoError

READER_COLUMNS = (
    "dataset",
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
    "size_class3",
    "size_class2",
)
LESION_INFO_COLUMNS = ("unique_object_id", "unique_video_name", "size [mm]")
VIDEO_INFO_COLUMNS = ("unique_video_name",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

_FRAME_NAME = re.compile(r"(?P<video>.+)_(?P<t>\d+)$")
_ANNOTATION_DIR = re.compile(r"(?P<video>.+)_annotations?")
_MAX_WORKERS = min(8, (os.cpu_count() or 1) + 2)

T = TypeVar("T")
R = TypeVar("R")


class Box(NamedTuple):
    """One annotated box of a frame, before its lesion's size is looked up."""

    video_id: str
    lesion_id: str
    frame_id: str
    frame_path: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int
    width: int
    height: int


def parallel_map(fn: Callable[[T], R], items: Sequence[T], chunk: int = 256) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool, in chunks (file I/O and C decoders release the GIL).

    Results keep the order of ``items``; the first failing item (in that order) raises its error.
    """
    if len(items) <= chunk:
        return [fn(x) for x in items]
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(max_workers=_MAX_WORKERS) as pool:
        return [r for part in pool.map(lambda c: [fn(x) for x in c], chunks) for r in part]


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise naming it."""
    if not path.is_dir():
        raise FsgEndoError(f"{path}: {what} not found")
    return path


def read_csv_strings(path: Path, what: str = "CSV file", **read_kw) -> pd.DataFrame:
    """A CSV as strings, or one error line saying that ``what`` is missing or does not parse."""
    if not path.is_file():
        raise FsgEndoError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, dtype=str, **read_kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise FsgEndoError(f"{path}: cannot read {what} ({one_line(err)})") from None


def read_table(path: Path, required: Iterable[str]) -> pd.DataFrame:
    """Read a CSV as strings, checking that it exists, parses and has the ``required`` columns."""
    table = read_csv_strings(path, skipinitialspace=True)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise FsgEndoError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
    return table


def check_box(box: Sequence[float], width: int, height: int, where: str) -> None:
    """Refuse a degenerate box or one that leaves its ``width`` x ``height`` frame."""
    xmin, ymin, xmax, ymax = box
    if not (0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height):
        raise FsgEndoError(
            f"{where}: box (xmin={xmin}, ymin={ymin}, xmax={xmax}, ymax={ymax}) is empty or "
            f"leaves the {width}x{height} frame"
        )


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _to_int(text: str | None, what: str, where: str) -> int:
    """Parse a pixel coordinate or size, rounding as the REAL-Colon tools do."""
    try:
        return round(float(text))
    except (TypeError, ValueError, OverflowError):
        raise FsgEndoError(f"{where}: {what} is missing or not a number ({text!r})") from None


def frames_rows(boxes: list[Box], sizes: dict[str, float], dataset: str) -> pd.DataFrame:
    """Rows of the manifest (without ``fold``) from boxes and a lesion -> size (mm) table."""
    df = pd.DataFrame(boxes, columns=list(Box._fields))
    df.insert(0, "dataset", dataset)
    df["size_mm"] = df["lesion_id"].map(sizes).astype(float)
    df["size_class3"] = np.asarray(size_class3(df["size_mm"].to_numpy()), dtype=np.int64)
    df["size_class2"] = np.asarray(size_class2(df["size_mm"].to_numpy()), dtype=np.int64)
    int_cols = ["xmin", "ymin", "xmax", "ymax", "width", "height"]
    df[int_cols] = df[int_cols].astype(np.int64)
    return df[list(READER_COLUMNS)].reset_index(drop=True)


def positive_size(value: str | float, where: str) -> float:
    """A lesion size in mm: a finite number > 0."""
    try:
        size = float(value)
    except (TypeError, ValueError):
        size = float("nan")
    if not np.isfinite(size) or size <= 0:
        raise FsgEndoError(f"{where}: size is missing or not a positive number ({value!r})")
    return float(size)


# --- REAL-Colon ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VocFrame:
    """What one REAL-Colon VOC file says: frame size and (lesion id, box) of each object."""

    width: int | None
    height: int | None
    objects: tuple[tuple[str, tuple[int, int, int, int]], ...]


def parse_voc(path: Path) -> _VocFrame:
    """Parse one REAL-Colon annotation file (Pascal-VOC with ``<unique_id>`` per object)."""
    try:
        root = ET.fromstring(path.read_bytes())
    except ET.ParseError as err:
        raise FsgEndoError(f"{path}: malformed XML ({one_line(err)})") from None
    except OSError as err:
        raise FsgEndoError(f"{path}: cannot read ({err.strerror})") from None
    objects = []
    for obj in root.iter("object"):
        lesion = (obj.findtext("unique_id") or "").strip()
        if not lesion:
            raise FsgEndoError(f"{path}: an <object> has no <unique_id>")
        bndbox = obj.find("bndbox")
        box = tuple(
            _to_int(None if bndbox is None else bndbox.findtext(k), f"<bndbox><{k}>", str(path))
            for k in ("xmin", "ymin", "xmax", "ymax")
        )
        objects.append((lesion, box))
    if not objects:
        return _VocFrame(None, None, ())
    size = root.find("size")
    width, height = (
        _to_int(None if size is None else size.findtext(k), f"<size><{k}>", str(path)) for k in ("width", "height")
    )
    return _VocFrame(width, height, tuple(objects))


def index_frames(frames_dir: Path, number: re.Pattern = _FRAME_NAME) -> tuple[set[str], dict[int, str]]:
    """File names of a frames folder, and frame number -> file name (zero-padded or not).

    ``number`` finds the frame number (its last group) in a file stem: REAL-Colon ``{video}_{t}``,
    SUN ``...image{N}``.
    """
    names = {e.name for e in os.scandir(frames_dir) if e.name.lower().endswith(IMAGE_SUFFIXES)}
    by_number = {}
    for name in sorted(names):
        m = number.search(Path(name).stem)
        if m:
            by_number.setdefault(int(m.groups()[-1]), name)
    return names, by_number


def _video_annotations(ann_dir: Path, video: str) -> list[tuple[int, Path]]:
    """(frame number, path) of each annotation XML of a video, in frame order."""
    found = []
    for entry in os.scandir(ann_dir):
        if not entry.name.lower().endswith(".xml"):
            continue
        m = _FRAME_NAME.fullmatch(entry.name[:-4])
        if m is None or m["video"] != video:
            raise FsgEndoError(f"{ann_dir / entry.name}: annotation file name is not '{video}_<frame>.xml'")
        found.append((int(m["t"]), ann_dir / entry.name))
    return sorted(found)


def _check_lesion(lesion: str, video: str, video_of: dict[str, str], xml_path: Path) -> None:
    """Refuse a lesion id missing from ``lesion_info.csv`` or listed there under another video."""
    if lesion not in video_of:
        raise FsgEndoError(f"{xml_path}: lesion '{lesion}' is not in lesion_info.csv")
    if video_of[lesion] != video:
        raise FsgEndoError(f"{xml_path}: lesion '{lesion}' belongs to video '{video_of[lesion]}' in lesion_info.csv")


def _realcolon_video_boxes(root: Path, video: str, ann_dir: Path, video_of: dict[str, str]) -> list[Box]:
    """Every lesion box of one REAL-Colon video, in frame order; ``video_of`` maps lesion -> video."""
    annotations = _video_annotations(ann_dir, video)
    parsed = parallel_map(parse_voc, [p for _, p in annotations])
    frames_dir = root / f"{video}_frames"
    names: set[str] | None = None
    by_number: dict[int, str] = {}
    boxes = []
    for (t, xml_path), voc in zip(annotations, parsed):
        if not voc.objects:
            continue
        if names is None:
            names, by_number = index_frames(require_dir(frames_dir, f"frames folder of video {video}"))
        name = xml_path.stem + ".jpg" if xml_path.stem + ".jpg" in names else by_number.get(t)
        if name is None:
            raise FsgEndoError(f"{xml_path}: its frame {xml_path.stem}.jpg is missing from {frames_dir}")
        for lesion, box in voc.objects:
            _check_lesion(lesion, video, video_of, xml_path)
            check_box(box, voc.width, voc.height, str(xml_path))
            boxes.append(Box(video, lesion, Path(name).stem, f"{video}_frames/{name}", *box, voc.width, voc.height))
    return boxes


def _realcolon_lesions(root: Path) -> pd.DataFrame:
    """``lesion_info.csv`` indexed by lesion id, checked against ``video_info.csv``."""
    lesion_csv, video_csv = root / "lesion_info.csv", root / "video_info.csv"
    lesions = read_table(lesion_csv, LESION_INFO_COLUMNS)
    videos = read_table(video_csv, VIDEO_INFO_COLUMNS)
    lesions["unique_object_id"] = lesions["unique_object_id"].str.strip()
    lesions["unique_video_name"] = lesions["unique_video_name"].str.strip()
    dup = lesions["unique_object_id"][lesions["unique_object_id"].duplicated()]
    if len(dup):
        raise FsgEndoError(f"{lesion_csv}: lesion '{dup.iloc[0]}' is listed twice")
    known_videos = set(videos["unique_video_name"].str.strip())
    unknown = lesions[~lesions["unique_video_name"].isin(known_videos)]
    if len(unknown):
        row = unknown.iloc[0]
        raise FsgEndoError(
            f"{lesion_csv}: lesion '{row['unique_object_id']}' names video "
            f"'{row['unique_video_name']}', which is not in {video_csv.name}"
        )
    return lesions.set_index("unique_object_id")


def _annotation_dirs(root: Path) -> list[tuple[str, Path]]:
    """(video name, folder) of every ``{video}_annotations`` folder under the root, sorted."""
    dirs = []
    for entry in os.scandir(root):
        m = _ANNOTATION_DIR.fullmatch(entry.name)
        if m and entry.is_dir():
            dirs.append((m["video"], root / entry.name))
    if not dirs:
        raise FsgEndoError(f"{root}: no '<video>_annotations' folders (not a REAL-Colon layout)")
    return sorted(dirs)


def read_realcolon(root: str | os.PathLike, dataset: str = "realcolon") -> pd.DataFrame:
    """Manifest rows (without ``fold``) of a REAL-Colon layout; negative frames give no rows.

    ``frame_path`` is relative to ``root`` with forward slashes; ``width``/``height`` come from the XML
    ``<size>``; ``size_mm`` from ``lesion_info.csv`` ``size [mm]``.
    """
    root = require_dir(Path(root), "dataset root")
    lesions = _realcolon_lesions(root)
    lesion_csv = root / "lesion_info.csv"
    video_of = lesions["unique_video_name"].to_dict()
    boxes = [
        b for video, ann_dir in _annotation_dirs(root) for b in _realcolon_video_boxes(root, video, ann_dir, video_of)
    ]
    used = sorted({b.lesion_id for b in boxes})
    sizes = {
        lid: positive_size(lesions.at[lid, "size [mm]"], f"{lesion_csv}: lesion '{lid}' 'size [mm]'") for lid in used
    }
    return frames_rows(boxes, sizes, dataset)


# --- SUN -------------------------------------------------------------------------------------------
