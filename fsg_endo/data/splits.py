"""Train/validation/test splits of a manifest by fold, with nested low-data subsets (docs/interfaces.md#manifest)."""

from __future__ import annotations

import hashlib
import math
from numbers import Real

import numpy as np
import pandas as pd

from fsg_endo.data.sizes import CLASS3_NAMES
from fsg_endo.errors import FsgEndoError

SPLIT_NAMES = ("train", "val", "test")


def lesion_rank_key(lesion_id: str, seed: int) -> int:
    """A seeded pseudo-random key of a lesion, stable across processes, folds and fractions."""
    digest = hashlib.blake2b(f"{seed}\x00{lesion_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def subsample_lesions(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Rows of the first ``ceil(fraction * n_c)`` lesions of each class in a seeded random order.

    Each lesion's place in the order depends only on its id and ``seed``, so smaller fractions keep
    subsets of larger ones (0.1 ⊂ 0.25 ⊂ 0.5 ⊂ 1.0) and every present class keeps at least one lesion.
    """
    lesions = df.groupby("lesion_id", sort=True)["size_class3"].first()
    keep = []
    for _, ids in lesions.groupby(lesions):
        order = sorted(ids.index, key=lambda lid: (lesion_rank_key(lid, seed), lid))
        keep.extend(order[: math.ceil(fraction * len(order))])
    return df[df["lesion_id"].isin(keep)]


def make_splits(
    manifest: pd.DataFrame, test_fold: int, val_fold: int, train_fraction: float = 1.0, seed: int = 0
) -> dict[str, pd.DataFrame]:
    """``{"train", "val", "test"}`` rows: test and validation are one fold each, train the other folds.

    ``train_fraction`` in (0, 1] keeps that share of the training lesions (not frames), per triclass,
    deterministic by ``seed`` and nested across fractions.
    """
    n_folds = int(manifest["fold"].max()) + 1 if len(manifest) else 0
    for name, fold in (("test_fold", test_fold), ("val_fold", val_fold)):
        if not 0 <= fold < n_folds:
            raise FsgEndoError(f"{name}={fold} is out of range: the manifest has folds 0..{n_folds - 1}")
    if test_fold == val_fold:
        raise FsgEndoError(f"test_fold and val_fold must differ (both are {test_fold})")
    if not (isinstance(train_fraction, Real) and 0 < train_fraction <= 1):
        raise FsgEndoError(f"train_fraction={train_fraction} must be in (0, 1]")
    train = manifest[~manifest["fold"].isin([test_fold, val_fold])]
    if train.empty:
        raise FsgEndoError(f"no training rows: every fold other than {test_fold} and {val_fold} is empty")
    if train_fraction < 1:
        train = subsample_lesions(train, train_fraction, seed)
    splits = {
        "train": train,
        "val": manifest[manifest["fold"] == val_fold],
        "test": manifest[manifest["fold"] == test_fold],
    }
    return {name: rows.reset_index(drop=True) for name, rows in splits.items()}


def _counts(rows: pd.DataFrame) -> dict[str, int]:
    """Videos, lesions, frames and boxes of some manifest rows, in total and per triclass."""
    out = {
        "videos": rows["video_id"].nunique(),
        "lesions": rows["lesion_id"].nunique(),
        "frames": rows["frame_path"].nunique(),
        "boxes": len(rows),
    }
    for c, name in enumerate(CLASS3_NAMES):
        of_class = rows[rows["size_class3"] == c]
        out[f"lesions_{name}"] = of_class["lesion_id"].nunique()
        out[f"frames_{name}"] = of_class["frame_path"].nunique()
    return out


def split_summary(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per split (column ``split``): videos, lesions, frames, boxes, lesions/frames per class."""
    table = pd.DataFrame([{"split": name, **_counts(rows)} for name, rows in splits.items()])
    counts = [c for c in table.columns if c != "split"]
    table[counts] = table[counts].astype(np.int64)
    return table
