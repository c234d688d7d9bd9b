"""The SUN layout reader (docs/interfaces.md#data-layouts): per case a ``caseN.txt`` of image paths and boxes, the
images under ``caseN/``, and the sizes from a CSV of ``case,size_mm``; a row per lesion box per frame."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
from PIL import Image

from fsg_endo.data.readers import (
    Box,
    check_box,
    frames_rows,
    index_frames,
    one_line,
    parallel_map,
    positive_size,
    read_table,
    require_dir,
)
from fsg_endo.errors import FsgEndoError

SUN_SIZES_COLUMNS = ("case", "size_mm")
_SUN_CASE_FILE = re.compile(r"case(?P<n>\d+)\.txt")
_SUN_IMAGE_NUMBER = re.compile(r"image(?P<n>\d+)$")
_NUM = r"-?\d+(?:\.\d*)?"
_SUN_BOX = re.compile(rf"({_NUM}),({_NUM}),({_NUM}),({_NUM}),(-?\d+)")
_SUN_LINE = re.compile(
    rf"(?P<path>\S.*?\.(?:jpe?g|png))(?P<boxes>(?:\s+{_NUM}(?:,{_NUM}){{3}},-?\d+)*)\s*", re.IGNORECASE
)


def _sun_sizes(root: Path, sizes_csv: str | os.PathLike | None) -> tuple[Path, dict[int, float]]:
    """Case number -> size (mm) from the ``case,size_mm`` CSV given with ``--sizes``."""
    if sizes_csv is None:
        raise FsgEndoError(
            f"{root}: a SUN dataset has no polyp sizes; give them with --sizes CSV (columns case,size_mm)"
        )
    path = Path(sizes_csv)
    table = read_table(path, SUN_SIZES_COLUMNS)
    sizes: dict[int, float] = {}
    for i, (case, size) in enumerate(zip(table["case"], table["size_mm"]), start=2):
        m = re.fullmatch(r"(?:case)?(\d+)", str(case).strip(), re.IGNORECASE)
        if m is None:
            raise FsgEndoError(f"{path}: line {i}: case {case!r} is not a case number")
        n = int(m[1])
        if n in sizes:
            raise FsgEndoError(f"{path}: line {i}: case {n} is listed twice")
        sizes[n] = positive_size(size, f"{path}: line {i}: case {n}")
    return path, sizes


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding it."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FsgEndoError(f"{path}: frame not found") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise FsgEndoError(f"{path}: cannot read image header ({one_line(err)})") from None


def _sun_frame_name(case_dir: Path, names: set[str], numbers: dict[int, str], path_text: str, where: str) -> str:
    """File name in ``case_dir`` of a frame named by an annotation line (any folder, any padding)."""
    base = re.split(r"[\\/]", path_text)[-1]
    if base in names:
        return base
    m = _SUN_IMAGE_NUMBER.search(Path(base).stem)
    if m and int(m["n"]) in numbers:
        return numbers[int(m["n"])]
    raise FsgEndoError(f"{where}: frame '{base}' is not in {case_dir}")


def _sun_case_lines(txt: Path) -> list[tuple[int, str, list[tuple[int, int, int, int]]]]:
    """(line number, image path, boxes) of each non-blank line of a SUN ``case{N}.txt``."""
    try:
        lines = txt.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FsgEndoError(f"{txt}: cannot read ({one_line(err)})") from None
    parsed = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        m = _SUN_LINE.fullmatch(line.strip())
        if m is None:
            raise FsgEndoError(
                f"{txt}: line {i}: cannot parse {line.strip()[:80]!r} "
                "(expected '<image path> xmin,ymin,xmax,ymax,class_id ...')"
            )
        boxes = [tuple(round(float(v)) for v in b.groups()[:4]) for b in _SUN_BOX.finditer(m["boxes"])]
        parsed.append((i, m["path"], boxes))
    return parsed


def _sun_case_boxes(root: Path, n: int, txt: Path) -> list[Box]:
    """Every polyp box of SUN case ``n``; its video and lesion are both ``case{n}``."""
    case = f"case{n}"
    case_dir = require_dir(root / case, f"frames folder of {case}")
    names, numbers = index_frames(case_dir, _SUN_IMAGE_NUMBER)
    lines = [
        (i, _sun_frame_name(case_dir, names, numbers, p, f"{txt}: line {i}"), boxes)
        for i, p, boxes in _sun_case_lines(txt)
        if boxes
    ]
    frame_names = sorted({name for _, name, _ in lines})
    frame_sizes = dict(zip(frame_names, parallel_map(_image_size, [case_dir / f for f in frame_names])))
    out = []
    for i, name, boxes in lines:
        width, height = frame_sizes[name]
        for box in boxes:
            check_box(box, width, height, f"{txt}: line {i}")
            out.append(Box(case, case, Path(name).stem, f"{case}/{name}", *box, width, height))
    return out


def read_sun(root: str | os.PathLike, sizes_csv: str | os.PathLike | None) -> pd.DataFrame:
    """Manifest rows (without ``fold``) of a SUN layout; ``video_id`` = ``lesion_id`` = ``case{N}``.

    Sizes come from ``sizes_csv`` (columns ``case``, ``size_mm``); ``width``/``height`` from each frame's
    image header.
    """
    root = require_dir(Path(root), "dataset root")
    ann_dir = require_dir(root / "annotation_txt", "SUN 'annotation_txt' folder")
    sizes_path, sizes = _sun_sizes(root, sizes_csv)
    cases = sorted(
        (int(m["n"]), ann_dir / e.name) for e in os.scandir(ann_dir) if (m := _SUN_CASE_FILE.fullmatch(e.name))
    )
    if not cases:
        raise FsgEndoError(f"{ann_dir}: no case<N>.txt annotation files")
    missing = [n for n, _ in cases if n not in sizes]
    if missing:
        raise FsgEndoError(f"{sizes_path}: case {missing[0]} (annotation_txt/case{missing[0]}.txt) has no size")
    boxes = [b for n, txt in cases for b in _sun_case_boxes(root, n, txt)]
    return frames_rows(boxes, {f"case{n}": s for n, s in sizes.items()}, "sun")
