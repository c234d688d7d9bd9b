"""REAL-Colon and SUN readers on tiny trees in the real layouts, and every bad input they must refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_data import EXPECTED_COLUMNS, voc_xml, write_jpeg, write_realcolon, write_sun

from fsg_endo.data.readers import read_realcolon
from fsg_endo.data.sun import read_sun
from fsg_endo.errors import FsgEndoError

# Size classes (docs/interfaces.md#size-classes) of the sizes below, by hand (boundaries 5.0, 9.9, 10.0 included).
CLASS3 = {3.0: 0, 5.0: 0, 5.1: 1, 7.5: 1, 9.9: 1, 10.0: 2, 12.0: 2}
CLASS2 = {3.0: 0, 5.0: 0, 5.1: 0, 7.5: 0, 9.9: 0, 10.0: 1, 12.0: 1}
SIZES = [[5.0, 9.9], [10.0], [3.0, 12.0, 7.5]]


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["frame_path", "lesion_id", "xmin", "ymin"]).reset_index(drop=True)


@pytest.fixture
def realcolon(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    root = tmp_path / "rc"
    return root, write_realcolon(root, SIZES, frames_per_lesion=2, negatives=3)


def test_realcolon_rows_are_what_was_written(realcolon):
    root, expected = realcolon
    df = read_realcolon(root)
    assert list(df.columns) == ["dataset", *EXPECTED_COLUMNS, "size_class3", "size_class2"]
    pd.testing.assert_frame_equal(_sorted(df[EXPECTED_COLUMNS]), _sorted(expected), check_dtype=False)
    assert (df["dataset"] == "realcolon").all()
    assert df["size_class3"].tolist() == [CLASS3[s] for s in df["size_mm"]]
    assert df["size_class2"].tolist() == [CLASS2[s] for s in df["size_mm"]]
    assert {df.loc[df.size_mm == s, "size_class3"].iloc[0] for s in (5.0, 9.9, 10.0)} == {0, 1, 2}
    for col in ("xmin", "ymin", "xmax", "ymax", "width", "height", "size_class3", "size_class2"):
        assert df[col].dtype == "int64", col
    assert all((root / p).is_file() and "\\" not in p for p in df["frame_path"])


def test_realcolon_negative_frames_give_no_rows_and_two_lesion_frame_two(realcolon):
    root, _ = realcolon
    df = read_realcolon(root)
    # 2 frames per lesion (6 lesions) + 2 rows for each two-lesion frame (videos 1 and 3)
    assert len(df) == 6 * 2 + 2 * 2
    xml_frames = {p.stem for p in root.glob("*_annotations/*.xml")}
    negatives = {p.stem for p in root.glob("*_annotations/*.xml") if "<object>" not in p.read_text()}
    assert len(negatives) == 3 * 3 and negatives <= xml_frames
    assert not negatives & set(df["frame_id"])
    per_frame = df.groupby("frame_id")["lesion_id"].agg(list)
    doubles = per_frame[per_frame.map(len) == 2]
    assert sorted(doubles.index) == ["001-001_6", "001-003_8"]
    assert doubles["001-001_6"] == ["001-001_1", "001-001_2"]


def test_realcolon_zero_padded_frame_files_and_synthetic_name(tmp_path):
    root = tmp_path / "padded"
    expected = write_realcolon(root, [[4.0, 11.0]], frame_pad=5)
    df = read_realcolon(root, dataset="synthetic")
    assert (df["dataset"] == "synthetic").all()
    assert df["frame_id"].str.fullmatch(r"001-001_\d{5}").all()
    pd.testing.assert_frame_equal(_sorted(df[EXPECTED_COLUMNS]), _sorted(expected), check_dtype=False)


def test_realcolon_fractional_coordinates_round_like_the_official_parser(tmp_path):
    root = tmp_path / "rc"
    write_realcolon(root, [[6.0]], frames_per_lesion=1, negatives=0)
    xml = root / "001-001_annotations" / "001-001_1.xml"
    xml.write_text(voc_xml("001-001_1.jpg", 64, 48, [("001-001_1", ("2.4", "3.6", "40.5", "47.0"))]))
    row = read_realcolon(root).iloc[0]
    assert (row.xmin, row.ymin, row.xmax, row.ymax) == (2, 4, 40, 47)  # round half to even, as round()


def test_sun_rows_are_what_was_written(tmp_path):
    root = tmp_path / "sun"
    sizes_csv, expected = write_sun(root, [5.0, 9.9, 10.0], frames_per_case=2)
    df = read_sun(root, sizes_csv)
    pd.testing.assert_frame_equal(_sorted(df[EXPECTED_COLUMNS]), _sorted(expected), check_dtype=False)
    assert (df["dataset"] == "sun").all()
    assert (df["video_id"] == df["lesion_id"]).all()
    assert df["size_class3"].tolist() == [CLASS3[s] for s in df["size_mm"]]
    assert set(df["width"]) == {80} and set(df["height"]) == {60}  # from the JPEG headers
    assert len(df) == 3 * 2 + 1  # the first line of case 1 has two boxes
    assert df["frame_id"].value_counts().max() == 2


# --- bad input: one line naming the file and the problem -------------------------------------------


def _expect_error(fn, *fragments: str) -> str:
    with pytest.raises(FsgEndoError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _edit_csv(path: Path, edit) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(df).to_csv(path, index=False)


def _xml(root: Path, stem: str) -> Path:
    return root / f"{stem.rsplit('_', 1)[0]}_annotations" / f"{stem}.xml"


def test_realcolon_missing_root(tmp_path):
    _expect_error(lambda: read_realcolon(tmp_path / "nowhere"), "nowhere", "not found")


def test_realcolon_not_a_realcolon_tree(tmp_path):
    (tmp_path / "lesion_info.csv").write_text("unique_object_id,unique_video_name,size [mm]\n")
    (tmp_path / "video_info.csv").write_text("unique_video_name\n")
    _expect_error(lambda: read_realcolon(tmp_path), str(tmp_path), "_annotations")


def test_realcolon_missing_lesion_info(realcolon):
    root, _ = realcolon
    (root / "lesion_info.csv").unlink()
    _expect_error(lambda: read_realcolon(root), "lesion_info.csv", "not found")


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("lesion_info.csv", "size [mm]"),
        ("lesion_info.csv", "unique_object_id"),
        ("video_info.csv", "unique_video_name"),
    ],
)
def test_realcolon_missing_columns(realcolon, name, column):
    root, _ = realcolon
    _edit_csv(root / name, lambda df: df.drop(columns=[column]))
    _expect_error(lambda: read_realcolon(root), name, "missing column", column)


def test_realcolon_unknown_lesion(realcolon):
    root, _ = realcolon
    _edit_csv(root / "lesion_info.csv", lambda df: df[df.unique_object_id != "001-003_2"])
    _expect_error(lambda: read_realcolon(root), "001-003_4.xml", "001-003_2", "not in lesion_info.csv")


def test_realcolon_lesion_of_another_video(realcolon):
    root, _ = realcolon
    _xml(root, "001-002_2").write_text(voc_xml("001-002_2.jpg", 64, 48, [("001-001_1", (1, 1, 9, 9))]))
    _expect_error(lambda: read_realcolon(root), "001-002_annotations", "001-001_1", "belongs to video")


def test_realcolon_lesion_of_unknown_video(realcolon):
    root, _ = realcolon
    _edit_csv(root / "video_info.csv", lambda df: df[df.unique_video_name != "001-002"])
    _expect_error(lambda: read_realcolon(root), "lesion_info.csv", "001-002", "video_info.csv")


@pytest.mark.parametrize("bad_size", ["", "NaN", "big", "-3"])
def test_realcolon_lesion_without_size(realcolon, bad_size):
    root, _ = realcolon

    def edit(df):
        df.loc[df.unique_object_id == "001-002_1", "size [mm]"] = bad_size
        return df

    _edit_csv(root / "lesion_info.csv", edit)
    _expect_error(lambda: read_realcolon(root), "lesion_info.csv", "001-002_1", "size")


@pytest.mark.parametrize("box", [(50, 10, 70, 20), (10, 40, 20, 49), (-1, 5, 10, 10), (20, 5, 20, 10), (30, 5, 10, 10)])
def test_realcolon_box_outside_frame_or_empty(realcolon, box):
    root, _ = realcolon
    _xml(root, "001-002_2").write_text(voc_xml("001-002_2.jpg", 64, 48, [("001-002_1", box)]))
    _expect_error(lambda: read_realcolon(root), "001-002_2.xml", "box", "64x48")


def test_realcolon_malformed_xml(realcolon):
    root, _ = realcolon
    xml = _xml(root, "001-001_2")
    xml.write_text(xml.read_text()[:-40])
    _expect_error(lambda: read_realcolon(root), "001-001_2.xml", "malformed XML")


def test_realcolon_object_without_lesion_id(realcolon):
    root, _ = realcolon
    _xml(root, "001-001_2").write_text(voc_xml("001-001_2.jpg", 64, 48, [("", (1, 1, 9, 9))]))
    _expect_error(lambda: read_realcolon(root), "001-001_2.xml", "unique_id")


def test_realcolon_missing_frame(realcolon):
    root, _ = realcolon
    (root / "001-003_frames" / "001-003_5.jpg").unlink()
    _expect_error(lambda: read_realcolon(root), "001-003_5.xml", "001-003_5.jpg", "missing")


def test_realcolon_missing_frames_folder(realcolon):
    root, _ = realcolon
    for f in (root / "001-002_frames").iterdir():
        f.unlink()
    (root / "001-002_frames").rmdir()
    _expect_error(lambda: read_realcolon(root), "001-002_frames", "not found")


def test_realcolon_annotation_file_of_another_video(realcolon):
    root, _ = realcolon
    (root / "001-001_annotations" / "001-009_1.xml").write_text(voc_xml("001-009_1.jpg", 64, 48, []))
    _expect_error(lambda: read_realcolon(root), "001-009_1.xml", "001-001_<frame>.xml")


@pytest.fixture
def sun(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "sun"
    sizes_csv, _ = write_sun(root, [4.0, 12.0])
    return root, sizes_csv


def test_sun_without_sizes(sun):
    root, sizes_csv = sun
    _expect_error(lambda: read_sun(root, None), "--sizes")
    _expect_error(lambda: read_sun(root, sizes_csv.with_name("nope.csv")), "nope.csv", "not found")


def test_sun_case_without_size(sun):
    root, sizes_csv = sun
    _edit_csv(sizes_csv, lambda df: df[df["case"] != "2"])
    _expect_error(lambda: read_sun(root, sizes_csv), sizes_csv.name, "case 2", "no size")


def test_sun_empty_size(sun):
    root, sizes_csv = sun

    def edit(df):
        df.loc[df["case"] == "1", "size_mm"] = ""
        return df

    _edit_csv(sizes_csv, edit)
    _expect_error(lambda: read_sun(root, sizes_csv), sizes_csv.name, "case 1", "size")


def test_sun_sizes_missing_column(sun):
    root, sizes_csv = sun
    _edit_csv(sizes_csv, lambda df: df.rename(columns={"size_mm": "size"}))
    _expect_error(lambda: read_sun(root, sizes_csv), sizes_csv.name, "missing column", "size_mm")


@pytest.mark.parametrize(
    "line", ["case1/x_image0001.jpg 10,10,20", "case1/x_image0001.jpg 1,2,3,4,0 junk", "just some words"]
)
def test_sun_unparseable_line(sun, line):
    root, sizes_csv = sun
    txt = root / "annotation_txt" / "case1.txt"
    txt.write_text(txt.read_text() + line + "\n")
    _expect_error(lambda: read_sun(root, sizes_csv), "case1.txt", "line 4", "cannot parse")


def test_sun_missing_frame(sun):
    root, sizes_csv = sun
    min((root / "case2").iterdir()).unlink()
    _expect_error(lambda: read_sun(root, sizes_csv), "case2.txt", "line 1", "is not in")


def test_sun_box_outside_frame(sun):
    root, sizes_csv = sun
    txt = root / "annotation_txt" / "case2.txt"
    first, *rest = txt.read_text().splitlines()
    txt.write_text("\n".join([first.split()[0] + " 10,10,81,20,0", *rest]) + "\n")
    _expect_error(lambda: read_sun(root, sizes_csv), "case2.txt", "line 1", "80x60")


def test_sun_unreadable_image_header(sun):
    root, sizes_csv = sun
    frame = sorted((root / "case1").iterdir())[1]
    frame.write_bytes(b"not an image")
    _expect_error(lambda: read_sun(root, sizes_csv), frame.name, "image header")


def test_sun_frame_found_by_image_number_when_padding_differs(sun):
    root, sizes_csv = sun
    txt = root / "annotation_txt" / "case1.txt"
    txt.write_text(txt.read_text().replace("image0002.jpg", "image2.jpg"))
    write_jpeg(root / "case1" / "unrelated.jpg", 8, 8, np.random.default_rng(0))
    df = read_sun(root, sizes_csv)
    case1 = df[df["video_id"] == "case1"]
    assert case1["frame_path"].str.endswith("image0002.jpg").sum() == 1


def test_cli_error_is_one_line_also_from_a_dataloader_worker():
    from fsg_endo.cli import one_line
    from fsg_endo.errors import FsgEndoError

    wrapped = FsgEndoError(
        "Caught FsgEndoError in DataLoader worker process 0.\nOriginal Traceback (most "
        'recent call last):\n  File "x.py", line 1\n'
        "fsg_endo.errors.FsgEndoError: cannot read frame a.jpg"
    )
    assert one_line(wrapped) == "cannot read frame a.jpg"
    assert one_line(FsgEndoError("m.csv: bad column")) == "m.csv: bad column"
