"""Splits by fold and nested, lesion-level, class-stratified low-data training subsets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fsg_endo.data.manifest import MANIFEST_COLUMNS
from fsg_endo.data.splits import make_splits, split_summary
from fsg_endo.errors import FsgEndoError

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def _class3(size: float) -> int:
    return 0 if size <= 5 else (1 if size < 10 else 2)


def _manifest(n_videos: int = 40, folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """A manifest built by hand: 1-3 lesions per video, 1-12 frames per lesion, folds by video."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(n_videos):
        video = f"001-{v:03d}"
        for k in range(1, int(rng.integers(1, 4)) + 1):
            size = float(rng.choice([2.0, 4.0, 5.0, 6.0, 9.9, 10.0, 15.0]))
            for t in range(int(rng.integers(1, 13))):
                frame = f"{video}_{k * 100 + t}"
                rows.append(
                    [
                        "realcolon",
                        video,
                        f"{video}_{k}",
                        frame,
                        f"{video}_frames/{frame}.jpg",
                        1,
                        1,
                        9,
                        9,
                        64,
                        48,
                        size,
                        _class3(size),
                        int(size >= 10),
                        v % folds,
                    ]
                )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return _manifest()


def _lesions(df: pd.DataFrame) -> set[str]:
    return set(df["lesion_id"])


def test_train_val_test_are_the_right_folds(manifest):
    splits = make_splits(manifest, test_fold=2, val_fold=4)
    assert list(splits) == ["train", "val", "test"]
    assert set(splits["test"]["fold"]) == {2} and set(splits["val"]["fold"]) == {4}
    assert set(splits["train"]["fold"]) == {0, 1, 3}
    assert sum(len(s) for s in splits.values()) == len(manifest)
    assert not _lesions(splits["train"]) & (_lesions(splits["val"]) | _lesions(splits["test"]))


def test_fractions_are_nested_and_leave_val_and_test_alone(manifest):
    full = make_splits(manifest, 0, 1)
    previous: set[str] = set()
    for f in FRACTIONS:
        splits = make_splits(manifest, 0, 1, train_fraction=f, seed=7)
        kept = _lesions(splits["train"])
        assert previous <= kept, f
        previous = kept
        for name in ("val", "test"):
            pd.testing.assert_frame_equal(splits[name], full[name])
    assert previous == _lesions(full["train"])


def test_fraction_keeps_a_share_of_lesions_per_class_with_all_their_frames(manifest):
    full = make_splits(manifest, 3, 0)["train"]
    for f in (0.1, 0.25, 0.5):
        train = make_splits(manifest, 3, 0, train_fraction=f, seed=1)["train"]
        for c in range(3):
            n_c = full.loc[full.size_class3 == c, "lesion_id"].nunique()
            kept = train.loc[train.size_class3 == c, "lesion_id"].nunique()
            assert kept == math.ceil(f * n_c) and kept >= 1, (f, c)
        # whole lesions are kept: every frame of a kept lesion, not a share of frames
        kept_rows = full[full["lesion_id"].isin(_lesions(train))]
        pd.testing.assert_frame_equal(train, kept_rows.reset_index(drop=True))


def test_subsets_are_deterministic_by_seed(manifest):
    a = make_splits(manifest, 0, 1, train_fraction=0.25, seed=3)["train"]
    b = make_splits(manifest, 0, 1, train_fraction=0.25, seed=3)["train"]
    pd.testing.assert_frame_equal(a, b)
    others = [_lesions(make_splits(manifest, 0, 1, train_fraction=0.25, seed=s)["train"]) for s in range(4, 10)]
    assert any(o != _lesions(a) for o in others)


def test_subset_does_not_depend_on_row_order(manifest):
    shuffled = manifest.sample(frac=1.0, random_state=0)
    a = make_splits(manifest, 0, 1, train_fraction=0.5, seed=2)["train"]
    b = make_splits(shuffled, 0, 1, train_fraction=0.5, seed=2)["train"]
    assert _lesions(a) == _lesions(b)


def test_tiny_fraction_keeps_one_lesion_of_each_present_class(manifest):
    train = make_splits(manifest, 0, 1, train_fraction=1e-6)["train"]
    assert train.groupby("size_class3")["lesion_id"].nunique().tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"test_fold": 1, "val_fold": 1}, "must differ"),
        ({"test_fold": 5, "val_fold": 1}, "test_fold=5 is out of range"),
        ({"test_fold": 0, "val_fold": -1}, "val_fold=-1 is out of range"),
        ({"test_fold": 0, "val_fold": 1, "train_fraction": 0.0}, "train_fraction=0.0"),
        ({"test_fold": 0, "val_fold": 1, "train_fraction": 1.5}, "train_fraction=1.5"),
        ({"test_fold": 0, "val_fold": 1, "train_fraction": float("nan")}, "train_fraction=nan"),
    ],
)
def test_bad_arguments(manifest, kwargs, fragment):
    with pytest.raises(FsgEndoError, match=fragment):
        make_splits(manifest, **kwargs)


def test_two_folds_leave_no_training_rows():
    with pytest.raises(FsgEndoError, match="no training rows"):
        make_splits(_manifest(n_videos=4, folds=2), 0, 1)


def test_summary_counts_by_hand():
    rows = [  # video, lesion, frame, size, fold
        ("v1", "v1_1", "f1", 3.0, 0),
        ("v1", "v1_1", "f2", 3.0, 0),
        ("v1", "v1_2", "f2", 7.0, 0),
        ("v2", "v2_1", "f3", 12.0, 0),
        ("v3", "v3_1", "f4", 5.0, 1),
        ("v4", "v4_1", "f5", 9.9, 2),
        ("v4", "v4_1", "f6", 9.9, 2),
        ("v4", "v4_1", "f7", 9.9, 2),
    ]
    df = pd.DataFrame(
        [
            ["x", v, les, fr, f"{v}/{fr}.jpg", 1, 1, 5, 5, 10, 10, s, _class3(s), int(s >= 10), fold]
            for v, les, fr, s, fold in rows
        ],
        columns=list(MANIFEST_COLUMNS),
    )
    table = split_summary(make_splits(df, test_fold=2, val_fold=1)).set_index("split")
    assert table.loc["train", ["videos", "lesions", "frames", "boxes"]].tolist() == [2, 3, 3, 4]
    assert table.loc["train", ["lesions_diminutive", "lesions_small", "lesions_large"]].tolist() == [1, 1, 1]
    assert table.loc["train", ["frames_diminutive", "frames_small", "frames_large"]].tolist() == [2, 1, 1]
    assert table.loc["val", ["videos", "lesions", "frames", "lesions_diminutive", "frames_small"]].tolist() == [
        1,
        1,
        1,
        1,
        0,
    ]
    assert table.loc["test", ["lesions", "frames", "lesions_small", "frames_small"]].tolist() == [1, 3, 1, 3]
    assert list(table.index) == ["train", "val", "test"]
