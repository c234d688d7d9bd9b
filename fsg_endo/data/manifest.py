"""Manifests (docs/interfaces.md#manifest): build from a dataset root, assign grouped stratified folds, write, load.

A manifest has one row per annotated lesion box in a frame, in the exact columns of
:data:`MANIFEST_COLUMNS`. Folds are assigned at the lesion level (see :func:`assign_folds`).
"""

from __future__ import annotations

import os
import posixpath
import re
import warnings
from collections.abc import Callable
from pathlib import Path, PureWindowsPath

import cv2
import numpy as np
import pandas as pd

from fsg_endo.data.readers import (
    READER_COLUMNS,
    parallel_map,
    read_csv_strings,
    read_realcolon,
    require_dir,
)
from fsg_endo.data.sizes import size_class2, size_class3
from fsg_endo.data.sun import read_sun
from fsg_endo.errors import FsgEndoError
from fsg_endo.io import atomic_path

MANIFEST_COLUMNS = (*READER_COLUMNS, "fold")
STRING_COLUMNS = ("dataset", "video_id", "lesion_id", "frame_id", "frame_path")
INT_COLUMNS = ("xmin", "ymin", "xmax", "ymax", "width", "height", "size_class3", "size_class2", "fold")
FORMATS = ("realcolon", "sun", "synthetic")


def build_manifest(
    fmt: str,
    root: str | os.PathLike,
    folds: int = 5,
    seed: int = 0,
    sizes: str | os.PathLike | None = None,
    check_images: bool = False,
) -> pd.DataFrame:
    """Read a dataset root in layout ``fmt`` and return its manifest with ``fold`` assigned.

    ``synthetic`` is read as REAL-Colon with ``dataset="synthetic"``; ``sizes`` (SUN only) is the
    ``case,size_mm`` CSV. ``check_images`` decodes every frame and reports the first unreadable one.
    """
    df = read_dataset(fmt, root, sizes)
    if check_images:
        check_frames(df, root)
    try:
        df["fold"] = assign_folds(df, folds, seed)
    except FsgEndoError as err:
        raise FsgEndoError(f"{root}: {err}") from None
    return df[list(MANIFEST_COLUMNS)]


def detect_format(root: str | os.PathLike) -> str:
    """The layout of a dataset root: ``sun`` when it has ``annotation_txt/``, else ``realcolon``."""
    return "sun" if (Path(root) / "annotation_txt").is_dir() else "realcolon"


def read_dataset(fmt: str, root: str | os.PathLike, sizes: str | os.PathLike | None = None) -> pd.DataFrame:
    """The manifest rows of a dataset root in layout ``fmt``, without folds (a whole dataset to test on)."""
    if fmt not in FORMATS:
        raise FsgEndoError(f"unknown dataset format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if sizes is not None and fmt != "sun":
        raise FsgEndoError(f"{sizes}: a sizes CSV applies to the SUN format only, not {fmt!r}")
    df = read_sun(root, sizes) if fmt == "sun" else read_realcolon(root, dataset=fmt)
    if df.empty:
        raise FsgEndoError(f"{root}: no annotated lesion boxes found (only negative frames?)")
    return df


def _lesion_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per lesion (sorted by id) with its video and triclass label."""
    return df.groupby("lesion_id", sort=True).agg(video_id=("video_id", "first"), size_class3=("size_class3", "first"))


def assign_folds(df: pd.DataFrame, k: int, seed: int) -> pd.Series:
    """Fold in ``[0, k)`` of each row: grouped by ``video_id``, stratified by ``size_class3``.

    Samples are lesions, not frames, so a lesion seen in many frames weighs as much as one seen in few
    (scikit-learn ``StratifiedGroupKFold(k, shuffle=True, random_state=seed)``). When no class has ``k``
    lesions, stratification is impossible and a seeded ``GroupKFold`` is used instead.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold  # ~1 s to import: only when needed

    if k < 2:
        raise FsgEndoError(f"need at least 2 folds, got {k}")
    lesions = _lesion_table(df)
    n_videos = lesions["video_id"].nunique()
    if n_videos < k:
        raise FsgEndoError(f"cannot make {k} folds from {n_videos} video(s): folds are grouped by video")
    y, groups = lesions["size_class3"].to_numpy(), lesions["video_id"].to_numpy()
    if np.bincount(y).max() >= k:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of = np.empty(len(lesions), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            fold_of[test] = fold
    return df["lesion_id"].map(dict(zip(lesions.index, fold_of))).astype(np.int64).rename("fold")


def check_frames(df: pd.DataFrame, root: str | os.PathLike) -> None:
    """Decode every frame of the manifest (OpenCV, thread pool); raise naming the first unreadable one."""
    root = Path(root)
    paths = [root / p for p in dict.fromkeys(df["frame_path"])]
    for path, ok in zip(paths, parallel_map(_decodes, paths)):
        if ok is not True:
            raise FsgEndoError(f"{path}: {ok}")


def _decodes(path: Path) -> bool | str:
    """True if the image decodes, else why not (``cv2.imdecode`` is quiet and refuses truncated JPEGs)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        return "frame not found"
    except OSError as err:
        return f"cannot read frame ({err.strerror})"
    if data.size == 0 or cv2.imdecode(data, cv2.IMREAD_COLOR) is None:
        return "frame cannot be decoded (corrupt or not an image)"
    return True


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest CSV atomically (temp name, then rename): no half-written file on failure."""
    if tuple(df.columns) != MANIFEST_COLUMNS:
        raise FsgEndoError(f"{path}: manifest columns must be {', '.join(MANIFEST_COLUMNS)}")
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def _row_error(path: Path, mask: pd.Series, df: pd.DataFrame, problem: str | Callable[[pd.Series], str]) -> None:
    """Raise naming the first row where ``mask`` is true (row 1 = first data row = CSV line 2)."""
    if mask.any():
        i = int(np.flatnonzero(mask.to_numpy())[0])
        text = problem(df.iloc[i]) if callable(problem) else problem
        raise FsgEndoError(f"{path}: row {i + 1} (line {i + 2}): {text}")


def leaves_root(frame_path: str) -> bool:
    """True if a relative-to-root path is absolute, has a drive, or climbs out with ``..``."""
    p = frame_path.replace("\\", "/")
    norm = posixpath.normpath(p)
    return (
        p.startswith("/")
        or bool(PureWindowsPath(frame_path).drive)
        or norm == ".."
        or norm.startswith("../")
        or bool(re.match(r"^[A-Za-z]:", p))
    )


def _read_manifest_csv(path: Path) -> pd.DataFrame:
    """The manifest CSV as strings, with its columns checked."""
    df = read_csv_strings(path, "manifest", keep_default_na=False)
    if tuple(df.columns) != MANIFEST_COLUMNS:
        missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
        extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
        detail = (f"missing {missing}" if missing else "") + (f" extra {extra}" if extra else "")
        raise FsgEndoError(
            f"{path}: wrong manifest columns ({detail.strip() or 'wrong order'}); expected {','.join(MANIFEST_COLUMNS)}"
        )
    return df


def _typed(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Convert the numeric columns, refusing empty strings, non-numbers and non-integers."""
    for col in STRING_COLUMNS:
        _row_error(path, df[col].str.strip() == "", df, f"empty {col}")
    for col in (*INT_COLUMNS, "size_mm"):
        values = pd.to_numeric(df[col], errors="coerce").astype(float)
        bad = ~np.isfinite(values)
        if col in INT_COLUMNS:
            bad |= values % 1 != 0
        kind = "an integer" if col in INT_COLUMNS else "a number"
        _row_error(path, bad, df, lambda r, c=col, k=kind: f"{c} {r[c]!r} is not {k}")
        df[col] = values.astype(np.int64) if col in INT_COLUMNS else values
    return df


def _check_consistency(df: pd.DataFrame, path: Path) -> None:
    """Sizes, classes, boxes, folds and paths agree with docs/interfaces.md#manifest and with each other."""
    size = df["size_mm"].to_numpy()
    _row_error(path, df["size_mm"] <= 0, df, lambda r: f"size_mm {r['size_mm']} is not positive")
    _row_error(
        path,
        df["size_class3"] != size_class3(size),
        df,
        lambda r: f"size_class3 {r['size_class3']} does not match size_mm {r['size_mm']}",
    )
    _row_error(
        path,
        df["size_class2"] != size_class2(size),
        df,
        lambda r: f"size_class2 {r['size_class2']} does not match size_mm {r['size_mm']}",
    )
    bad_box = ~(
        (0 <= df["xmin"])
        & (df["xmin"] < df["xmax"])
        & (df["xmax"] <= df["width"])
        & (0 <= df["ymin"])
        & (df["ymin"] < df["ymax"])
        & (df["ymax"] <= df["height"])
    )
    _row_error(path, bad_box, df, "box is empty or leaves its frame")
    _row_error(path, df["fold"] < 0, df, lambda r: f"fold {r['fold']} is negative")
    _row_error(
        path, df["frame_path"].map(leaves_root), df, lambda r: f"frame_path {r['frame_path']!r} leaves the dataset root"
    )
    for key, col in (("lesion_id", "video_id"), ("lesion_id", "size_mm"), ("video_id", "fold")):
        spread = df.groupby(key)[col].transform("nunique") > 1
        _row_error(path, spread, df, lambda r, k=key, c=col: f"{k} {r[k]!r} has more than one {c}")


def load_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read and check a manifest: exact columns, integer folds, classes consistent with ``size_mm``.

    A ``frame_path`` that leaves the dataset root (absolute, drive, ``..``) is always refused; with
    ``root``, the root must also be an existing folder. Errors name the manifest and the row.
    """
    path = Path(path)
    if root is not None:
        require_dir(Path(root), "dataset root")
    df = _typed(_read_manifest_csv(path), path)
    _check_consistency(df, path)
    return df
