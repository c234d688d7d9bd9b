"""The pretraining corpus: frame folders and crop boxes like the sizing task's, checked by hand."""

import cv2
import numpy as np
import pandas as pd
import pytest

from fsg_endo.data.corpus import crop_rows, frame_table, relative_sides
from fsg_endo.errors import FsgEndoError


def test_frame_table_lists_frames_by_folder_with_their_size(tmp_path):
    for video, n in (("a", 2), ("b/c", 1)):
        (tmp_path / video).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(tmp_path / video / f"{i:03d}.png"), np.zeros((30, 40, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not a frame")
    table = frame_table(tmp_path)
    assert table["frame_path"].tolist() == ["a/000.png", "a/001.png", "b/c/000.png"]
    assert table["video_id"].tolist() == ["a", "a", "b/c"]
    assert (table["width"] == 40).all() and (table["height"] == 30).all()
    (tmp_path / "a" / "002.png").write_bytes(b"broken")
    with pytest.raises(FsgEndoError, match="002.png: not a readable image"):
        frame_table(tmp_path)
    with pytest.raises(FsgEndoError, match="no frames"):
        frame_table(tmp_path / "b" / "nothing")


def test_crop_boxes_follow_the_sides_stay_in_the_fov_and_repeat_by_seed():
    frames = pd.DataFrame(
        {
            "video_id": ["v", "w"],
            "frame_id": ["v_1", "w_1"],
            "frame_path": ["v/1.png", "w/1.png"],
            "width": [320, 200],
            "height": [240, 200],
        }
    )
    boxes = pd.DataFrame(
        {"xmin": [10, 0], "xmax": [34, 60], "ymin": [5, 0], "ymax": [20, 30], "width": [240, 300], "height": [240, 200]}
    )
    sides = relative_sides(boxes)
    np.testing.assert_allclose(sides, [24 / 240, 60 / 200])
    rows = crop_rows(frames, sides, crops_per_frame=500, seed=3)
    assert len(rows) == 1000 and rows["size_mm"].isna().all() and rows["lesion_id"].is_unique
    w, h = rows["xmax"] - rows["xmin"], rows["ymax"] - rows["ymin"]
    assert (w == h).all()
    short = np.minimum(rows["width"], rows["height"])
    assert set(np.round(w / short, 1)) <= {0.1, 0.3}  # every side is one of the two relative sides
    corners = [
        (rows["xmin"], rows["ymin"]),
        (rows["xmax"], rows["ymin"]),
        (rows["xmin"], rows["ymax"]),
        (rows["xmax"], rows["ymax"]),
    ]
    for x, y in corners:  # every corner inside the inscribed circle (1 px of rounding)
        assert (np.hypot(x - rows["width"] / 2, y - rows["height"] / 2) <= short / 2 + 1.5).all()
    cx = (rows["xmin"] + rows["xmax"]) / 2 - rows["width"] / 2
    assert abs(cx.mean()) < 3 and cx.std() > 10  # spread over the field of view, centred
    pd.testing.assert_frame_equal(rows, crop_rows(frames, sides, crops_per_frame=500, seed=3))
    assert not rows.equals(crop_rows(frames, sides, crops_per_frame=500, seed=4))
