"""Manifests: exact columns, grouped and stratified folds, atomic write, checked load, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_data import write_realcolon, write_sun

from fsg_endo.data.manifest import (
    MANIFEST_COLUMNS,
    assign_folds,
    build_manifest,
    load_manifest,
    write_manifest,
)
from fsg_endo.errors import FsgEndoError

DOCUMENTED_COLUMNS = [
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
    "fold",
]


@pytest.fixture(scope="module")
def realcolon(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rc")
    sizes = [[2.0, 5.0], [9.9], [10.0, 3.0], [6.0], [12.0, 4.0, 8.0], [1.5], [15.0], [7.0, 5.5]]
    write_realcolon(root, sizes, frames_per_lesion=2, negatives=1)
    return root


@pytest.fixture(scope="module")
def manifest(realcolon) -> pd.DataFrame:
    return build_manifest("realcolon", realcolon, folds=4, seed=0)


def test_columns_are_the_documented_columns_in_order(manifest):
    assert list(MANIFEST_COLUMNS) == DOCUMENTED_COLUMNS
    assert list(manifest.columns) == DOCUMENTED_COLUMNS
    assert manifest["fold"].dtype == "int64"


def test_folds_are_grouped_by_video_and_cover_every_fold(manifest):
    assert manifest.groupby("video_id")["fold"].nunique().max() == 1
    assert sorted(manifest["fold"].unique()) == [0, 1, 2, 3]


def test_folds_are_deterministic_and_depend_on_the_seed(realcolon, manifest):
    again = build_manifest("realcolon", realcolon, folds=4, seed=0)
    pd.testing.assert_frame_equal(manifest, again)
    by_seed = [tuple(assign_folds(manifest, 4, seed)) for seed in range(1, 8)]
    assert any(f != tuple(manifest["fold"]) for f in by_seed)


def test_folds_do_not_depend_on_row_order(manifest):
    shuffled = manifest.sample(frac=1.0, random_state=3)
    folds = assign_folds(shuffled, 4, 0)
    assert (folds == manifest.loc[shuffled.index, "fold"]).all()


def test_folds_are_stratified_by_class_at_the_lesion_level():
    # 15 one-lesion videos, 5 per class; lesion 0 of class 0 has many frames, which must not matter.
    rows = []
    for v, size in enumerate([3.0] * 5 + [7.0] * 5 + [12.0] * 5):
        for f in range(20 if v == 0 else 1):
            rows.append(
                {
                    "video_id": f"v{v:02d}",
                    "lesion_id": f"v{v:02d}_1",
                    "frame_id": f"v{v:02d}_{f}",
                    "size_class3": 0 if size <= 5 else (1 if size < 10 else 2),
                }
            )
    df = pd.DataFrame(rows)
    folds = assign_folds(df, 5, seed=11)
    per_fold = df.assign(fold=folds).drop_duplicates("lesion_id").groupby("fold")["size_class3"].agg(sorted)
    assert per_fold.tolist() == [[0, 1, 2]] * 5


def test_fewer_videos_than_folds_is_an_error(tmp_path):
    write_realcolon(tmp_path / "rc", [[3.0], [7.0], [12.0]])
    with pytest.raises(FsgEndoError, match=r"3 video.*5 folds|5 folds.*3 video"):
        build_manifest("realcolon", tmp_path / "rc", folds=5)


def test_small_data_without_a_stratifiable_class_still_gets_grouped_folds(tmp_path):
    write_realcolon(tmp_path / "rc", [[3.0], [7.0], [12.0], [4.0]], two_lesion_frame=False)
    df = build_manifest("realcolon", tmp_path / "rc", folds=3, seed=1)
    assert sorted(df["fold"].unique()) == [0, 1, 2]
    assert df.groupby("video_id")["fold"].nunique().max() == 1


def test_sun_and_synthetic_formats(tmp_path):
    sizes_csv, expected = write_sun(tmp_path / "sun", [3.0, 6.0, 11.0])
    sun = build_manifest("sun", tmp_path / "sun", folds=3, sizes=sizes_csv)
    assert len(sun) == len(expected) and (sun["dataset"] == "sun").all()
    assert sorted(sun.drop_duplicates("video_id")["fold"]) == [0, 1, 2]
    write_realcolon(tmp_path / "syn", [[3.0], [7.0]])
    syn = build_manifest("synthetic", tmp_path / "syn", folds=2)
    assert (syn["dataset"] == "synthetic").all()
    with pytest.raises(FsgEndoError, match="SUN"):
        build_manifest("synthetic", tmp_path / "syn", folds=2, sizes=sizes_csv)
    with pytest.raises(FsgEndoError, match="unknown dataset format"):
        build_manifest("kvasir", tmp_path / "syn")


def test_only_negative_frames_is_an_error(tmp_path):
    write_realcolon(tmp_path / "rc", [[], []], negatives=2)
    with pytest.raises(FsgEndoError, match="no annotated lesion boxes"):
        build_manifest("realcolon", tmp_path / "rc", folds=2)


def test_write_then_load_round_trips(manifest, realcolon, tmp_path):
    out = write_manifest(manifest, tmp_path / "sub" / "m.csv")
    assert [p.name for p in out.parent.iterdir()] == ["m.csv"]  # no temp file left behind
    loaded = load_manifest(out, root=realcolon)
    pd.testing.assert_frame_equal(loaded, manifest.reset_index(drop=True))
    assert loaded["size_mm"].dtype == "float64"


def test_write_refuses_wrong_columns(manifest, tmp_path):
    with pytest.raises(FsgEndoError, match="columns"):
        write_manifest(manifest.drop(columns=["fold"]), tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_check_images_passes_on_good_frames(realcolon):
    assert len(build_manifest("realcolon", realcolon, folds=2, check_images=True)) > 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_check_images_reports_a_corrupt_frame(tmp_path, damage):
    root = tmp_path / "rc"
    write_realcolon(root, [[3.0, 12.0], [7.0]])
    frame = root / "001-001_frames" / "001-001_4.jpg"
    data = frame.read_bytes()
    frame.write_bytes({"garbage": b"\x00not a jpeg" * 20, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    assert len(build_manifest("realcolon", root, folds=2)) > 0  # only --check-images decodes
    with pytest.raises(FsgEndoError) as info:
        build_manifest("realcolon", root, folds=2, check_images=True)
    assert "001-001_4.jpg" in str(info.value) and "decoded" in str(info.value)


# --- load_manifest refuses malformed manifests ------------------------------------------------------


def _write_raw(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda df: df.drop(columns=["fold"]), "missing ['fold']"),
        (lambda df: df.assign(extra=1), "extra ['extra']"),
        (lambda df: df[list(reversed(df.columns))], "wrong order"),
    ],
)
def test_load_refuses_wrong_columns(manifest, tmp_path, edit, fragment):
    path = _write_raw(edit(manifest), tmp_path / "bad.csv")
    with pytest.raises(FsgEndoError) as info:
        load_manifest(path)
    assert "bad.csv" in str(info.value) and fragment in str(info.value)


def _set(df: pd.DataFrame, row: int, col: str, value) -> pd.DataFrame:
    df = df.astype({col: object})
    df.loc[df.index[row], col] = value
    return df


@pytest.mark.parametrize(
    ("col", "value", "fragment"),
    [
        ("fold", "1.5", "fold '1.5' is not an integer"),
        ("fold", "", "is not an integer"),
        ("fold", -1, "fold -1 is negative"),
        ("xmin", "a", "xmin 'a' is not an integer"),
        ("size_mm", "x", "size_mm 'x' is not a number"),
        ("size_class3", 2, "size_class3 2 does not match"),
        ("size_class2", 1, "size_class2 1 does not match"),
        ("xmax", 1000, "box"),
        ("frame_path", "../outside/x.jpg", "leaves the dataset root"),
        ("frame_path", "001-001_frames/../../x.jpg", "leaves the dataset root"),
        ("frame_path", "/etc/x.jpg", "leaves the dataset root"),
        ("frame_path", "C:\\data\\x.jpg", "leaves the dataset root"),
        ("frame_path", "..\\x.jpg", "leaves the dataset root"),
        ("lesion_id", "", "empty lesion_id"),
    ],
)
def test_load_refuses_bad_rows_naming_file_and_row(manifest, tmp_path, col, value, fragment):
    row = int(np.flatnonzero(manifest["size_mm"] < 5)[1])  # a diminutive lesion: classes 0 and 0
    path = _write_raw(_set(manifest.copy(), row, col, value), tmp_path / "bad.csv")
    with pytest.raises(FsgEndoError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "bad.csv" in message and f"row {row + 1} (line {row + 2})" in message and fragment in message, message


def test_load_accepts_inner_dotdot_that_stays_inside(manifest, tmp_path):
    fine = _set(manifest.copy(), 0, "frame_path", "001-001_frames/../001-001_frames/x.jpg")
    assert len(load_manifest(_write_raw(fine, tmp_path / "ok.csv"))) == len(manifest)


def test_load_refuses_inconsistent_groups(manifest, tmp_path):
    video = manifest["video_id"].iloc[0]
    bad = manifest.copy()
    bad.loc[bad.index[bad.video_id == video][0], "fold"] = (manifest["fold"].iloc[0] + 1) % 4
    with pytest.raises(FsgEndoError, match=f"video_id '{video}' has more than one fold"):
        load_manifest(_write_raw(bad, tmp_path / "bad.csv"))


def test_load_missing_manifest_or_root(manifest, tmp_path):
    with pytest.raises(FsgEndoError, match="nope.csv: manifest not found"):
        load_manifest(tmp_path / "nope.csv")
    path = write_manifest(manifest, tmp_path / "m.csv")
    with pytest.raises(FsgEndoError, match="dataset root not found"):
        load_manifest(path, root=tmp_path / "no_root")


# --- the CLI end to end ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fsg_endo", "manifest", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_writes_a_manifest(realcolon, tmp_path):
    out = tmp_path / "m.csv"
    run = _cli("--format", "realcolon", "--root", str(realcolon), "--out", str(out), "--folds", "3")
    assert run.returncode == 0, run.stderr
    df = load_manifest(out, root=realcolon)
    assert sorted(df["fold"].unique()) == [0, 1, 2]


def _cli_error_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    rc = tmp_path / "rc"
    write_realcolon(rc, [[3.0, 12.0], [7.0], [4.0]])
    (rc / "lesion_info.csv").rename(rc / "moved.csv")
    corrupt = tmp_path / "corrupt"
    write_realcolon(corrupt, [[3.0], [7.0], [4.0]])
    (corrupt / "001-002_frames" / "001-002_2.jpg").write_bytes(b"garbage")
    write_sun(tmp_path / "sun", [3.0, 8.0])
    return [
        (["--format", "realcolon", "--root", str(rc)], "lesion_info.csv"),
        (["--format", "realcolon", "--root", str(corrupt), "--check-images", "--folds", "2"], "001-002_2.jpg"),
        (["--format", "sun", "--root", str(tmp_path / "sun")], "--sizes"),
    ]


def test_cli_bad_input_is_one_line_exit_2_and_no_output(tmp_path):
    existing = tmp_path / "existing.csv"
    existing.write_text("precious\n")
    for i, (args, fragment) in enumerate(_cli_error_cases(tmp_path)):
        out = existing if i % 2 else tmp_path / f"fresh{i}.csv"
        run = _cli(*args, "--out", str(out))
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2, run.stderr
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in run.stderr, run.stderr
    assert existing.read_text() == "precious\n"
    assert not list(tmp_path.glob("fresh*")) and not list(tmp_path.glob(".*.tmp"))
