"""The MONAI crop pipeline and the lesion frame sampler, against hand computations on painted frames."""

from __future__ import annotations

from pathlib import Path

import cv2
import monai.data
import numpy as np
import pandas as pd
import pytest
import torch

from fsg_endo.data.pipeline import build_dataset, compute_mean_std, make_loader, seed_augmentation
from fsg_endo.data.sampling import LesionFrameSampler
from fsg_endo.data.sizes import scale_size, size_class2, size_class3
from fsg_endo.errors import FsgEndoError

W, H = 96, 72  # frame width, height; inscribed FOV circle: centre (48, 36), radius 36
BACKGROUND = np.array([40, 80, 120])  # RGB
SQUARE = np.array([200, 50, 30])
BOX = (40, 30, 56, 46)  # 16 x 16, centre (48, 38): with context 0.5 the crop is the 32 px square at (32, 22)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
VIDEO = "001-001"


def paint(box: tuple[int, int, int, int], square: np.ndarray = SQUARE) -> np.ndarray:
    """An RGB frame of BACKGROUND with ``square`` filling ``box``."""
    frame = np.empty((H, W, 3), np.uint8)
    frame[:] = BACKGROUND
    xmin, ymin, xmax, ymax = box
    frame[ymin:ymax, xmin:xmax] = square
    return frame


def row(t: int, box: tuple[int, int, int, int], size_mm: float, lesion: str, ext: str = "png") -> dict:
    """A manifest row of frame ``t`` of VIDEO."""
    stem = f"{VIDEO}_{t}"
    return {
        "dataset": "test",
        "video_id": VIDEO,
        "lesion_id": lesion,
        "frame_id": stem,
        "frame_path": f"{VIDEO}_frames/{stem}.{ext}",
        "xmin": box[0],
        "ymin": box[1],
        "xmax": box[2],
        "ymax": box[3],
        "width": W,
        "height": H,
        "size_mm": size_mm,
        "fold": 0,
    }


def write_frames(root: Path, frames: list[np.ndarray], rows: list[dict]) -> None:
    """Write each RGB frame to its row's path (lossless PNG or JPEG by extension)."""
    for frame, r in zip(frames, rows):
        path = root / r["frame_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def painted(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Frames 0-2: the square at BOX (sizes 3, 7.5, 10 mm); frame 3: a box at the top-left corner."""
    root = tmp_path_factory.mktemp("painted")
    corner = (0, 0, 16, 16)
    rows = [
        row(0, BOX, 3.0, f"{VIDEO}_1"),
        row(1, BOX, 7.5, f"{VIDEO}_2"),
        row(2, BOX, 10.0, f"{VIDEO}_3"),
        row(3, corner, 4.0, f"{VIDEO}_4"),
    ]
    write_frames(root, [paint(BOX)] * 3 + [paint(corner)], rows)
    return root, pd.DataFrame(rows)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Eight JPEG frames and the same frames as an mp4; the square's colour changes with the frame."""
    root = tmp_path_factory.mktemp("video")
    frames = [paint(BOX, np.array([200, 30 + 25 * t, 220 - 25 * t])) for t in range(8)]
    rows = [row(t, BOX, 6.0, f"{VIDEO}_1", ext="jpg") for t in range(8)]
    write_frames(root, frames, rows)
    (root / "videos").mkdir()
    writer = cv2.VideoWriter(str(root / "videos" / f"{VIDEO}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return root, pd.DataFrame(rows)


def normalised(rgb: np.ndarray) -> np.ndarray:
    return (rgb / 255.0 - np.array(MEAN)) / np.array(STD)


def test_item_keys_shapes_dtypes(painted):
    root, rows = painted
    item = build_dataset(rows, root, image_size=16, cache="none", mean=MEAN, std=STD)[0]
    assert set(item) == {
        "image",
        "box",
        "size_mm",
        "target_reg",
        "size_class3",
        "size_class2",
        "lesion_id",
        "video_id",
        "frame_id",
    }
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["box"].shape == (4,) and item["box"].dtype == torch.float32
    for key in ("size_mm", "target_reg"):
        assert item[key].dtype == torch.float32 and item[key].shape == ()
    for key in ("size_class3", "size_class2"):
        assert item[key].dtype == torch.int64
    assert (item["lesion_id"], item["video_id"], item["frame_id"]) == (f"{VIDEO}_1", VIDEO, f"{VIDEO}_0")


def test_crop_normalisation_matches_hand_computation(painted):
    root, rows = painted
    image = build_dataset(rows, root, image_size=16, cache="none", mean=MEAN, std=STD)[0]["image"].numpy()
    # crop 32 px -> 16 px: the box fills crop pixels 8..24, i.e. output pixels 4..12
    inside = np.zeros((16, 16), bool)
    inside[4:12, 4:12] = True
    expected = np.where(inside[None], normalised(SQUARE)[:, None, None], normalised(BACKGROUND)[:, None, None])
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_border_padding_is_black(painted):
    root, rows = painted
    image = build_dataset(rows.iloc[[3]], root, image_size=16, fov_mask=False, cache="none")[0]["image"].numpy()
    # box (0, 0, 16, 16): 32 px crop at (-8, -8), so its first 8 rows and columns (4 after resizing) are padding
    assert np.all(image[:, :4, :] == 0) and np.all(image[:, :, :4] == 0)
    np.testing.assert_allclose(
        image[:, 4:12, 4:12], (SQUARE / 255.0)[:, None, None].repeat(8, 1).repeat(8, 2), atol=1e-6
    )
    np.testing.assert_allclose(
        image[:, 12:, 12:], (BACKGROUND / 255.0)[:, None, None].repeat(4, 1).repeat(4, 2), atol=1e-6
    )


def test_fov_mask_zeroes_outside_the_inscribed_circle(tmp_path):
    box = (W - 16, H - 16, W, H)  # bottom-right corner: crop 32 px at (72, 48)
    rows = pd.DataFrame([row(0, box, 4.0, "a")])
    write_frames(tmp_path, [paint(box)], rows.to_dict("records"))
    masked = build_dataset(rows, tmp_path, image_size=32, cache="none")[0]["image"].numpy()
    plain = build_dataset(rows, tmp_path, image_size=32, fov_mask=False, cache="none")[0]["image"].numpy()
    ys, xs = np.mgrid[48:80, 72:104] + 0.5
    outside = (xs - W / 2) ** 2 + (ys - H / 2) ** 2 > (H / 2) ** 2
    assert outside.any() and (~outside).any()
    assert np.all(masked[:, outside] == 0)
    np.testing.assert_array_equal(masked[:, ~outside], plain[:, ~outside])
    in_frame = (xs < W) & (ys < H)
    assert np.all(plain[:, outside & in_frame] > 0)


def test_box_features_and_targets(painted):
    root, rows = painted
    ds = build_dataset(rows, root, image_size=16, cache="none")
    expected_box = [np.log(16 / W), np.log(16 / H), 48 / W, 38 / H]
    for i, (size, c3, c2) in enumerate([(3.0, 0, 0), (7.5, 1, 0), (10.0, 2, 1)]):
        item = ds[i]
        np.testing.assert_allclose(item["box"].numpy(), expected_box, rtol=1e-6)
        assert item["size_mm"].item() == size
        assert item["size_class3"].item() == c3 == size_class3(size)
        assert item["size_class2"].item() == c2 == size_class2(size)
        assert item["target_reg"].item() == pytest.approx(float(scale_size(size)), abs=1e-6)
        assert item["target_reg"].item() == pytest.approx(2 * (size - 0.5) / 19.5 - 1, abs=1e-6)
    np.testing.assert_allclose(ds[3]["box"].numpy(), [np.log(16 / W), np.log(16 / H), 8 / W, 8 / H], rtol=1e-6)


def test_mean_std_matches_hand_computation(painted):
    root, rows = painted
    mean, std = compute_mean_std(rows.iloc[:3], root, image_size=16)
    share = 0.25  # the box is a quarter of the crop's area
    expected_mean = (share * SQUARE + (1 - share) * BACKGROUND) / 255.0
    expected_std = np.sqrt(share * (1 - share)) * np.abs(SQUARE - BACKGROUND) / 255.0
    np.testing.assert_allclose(mean, expected_mean, atol=1e-6)
    np.testing.assert_allclose(std, expected_std, atol=1e-6)


def test_video_source_matches_frames(video):
    root, rows = video
    from_frames = build_dataset(rows, root, image_size=32, cache="none")
    from_video = build_dataset(rows, root, image_size=32, cache="none", source="video")
    frames = [from_frames[u]["image"] for u in range(8)]
    # 0 -> 5, 3 -> 7: decode forward; 5 -> 2, 7 -> 0: seek back; 2 -> 3, 0 -> 1: next frame; 1 -> 1: same frame
    for t in (5, 2, 3, 7, 0, 1, 1):
        diffs = [(from_video[t]["image"] - frame).abs().mean().item() for frame in frames]
        assert diffs[t] < 0.03
        assert int(np.argmin(diffs)) == t
    beyond = build_dataset(rows.iloc[[0]].assign(frame_id=f"{VIDEO}_8"), root, cache="none", source="video")
    with pytest.raises(FsgEndoError, match=r"cannot read frame 8 of video .*001-001\.mp4"):
        beyond[0]


def test_cache_modes_give_the_same_items(painted, tmp_path):
    root, rows = painted
    kwargs = dict(image_size=16, mean=MEAN, std=STD, cache_dir=tmp_path)
    datasets = {mode: build_dataset(rows, root, cache=mode, **kwargs) for mode in ("none", "memory", "disk")}
    assert type(datasets["none"]).__mro__[2] is monai.data.Dataset
    assert isinstance(datasets["memory"], monai.data.CacheDataset)
    assert isinstance(datasets["disk"], monai.data.PersistentDataset)
    reloaded = build_dataset(rows, root, cache="disk", **kwargs)  # served from the files written above
    for i in range(len(rows)):
        reference = datasets["none"][i]
        for ds in (datasets["memory"], datasets["disk"], datasets["disk"], reloaded):
            item = ds[i]
            assert torch.equal(item["image"], reference["image"])
            assert torch.equal(item["box"], reference["box"]) and item["frame_id"] == reference["frame_id"]
    assert len(list(tmp_path.rglob("*.pt"))) == len(rows)


def test_augmentation_changes_items_reproducibly(painted):
    root, rows = painted
    val = build_dataset(rows, root, image_size=16, cache="none")[0]["image"]
    first = build_dataset(rows, root, image_size=16, cache="memory", train=True, seed=0)
    again = build_dataset(rows, root, image_size=16, cache="memory", train=True, seed=0)
    other = build_dataset(rows, root, image_size=16, cache="memory", train=True, seed=1)
    a, b = first[0]["image"], again[0]["image"]
    assert torch.equal(a, b)
    assert not torch.equal(a, val) and not torch.equal(a, other[0]["image"])
    assert not torch.equal(first[0]["image"], a)  # the next draw differs
    assert a.shape == val.shape


@pytest.mark.parametrize("photometric", [True, False])
def test_geometric_augmentation_keeps_the_rendered_colour(painted, photometric):
    """Without colour jitter and noise the crop's centre (inside the square under any rotation of +-30 deg and
    flip) keeps the square's exact colour; with them it does not."""
    root, rows = painted
    ds = build_dataset(rows.iloc[:3], root, image_size=16, cache="memory", train=True, seed=0, photometric=photometric)
    centres = torch.stack([ds[i % 3]["image"][:, 6:10, 6:10] for i in range(12)])
    square = torch.tensor(SQUARE / 255.0, dtype=torch.float32)[None, :, None, None]
    assert torch.allclose(centres, square.expand_as(centres), atol=1e-6) is not photometric


def test_seed_augmentation_fixes_the_next_draw(painted):
    root, rows = painted
    ds = build_dataset(rows, root, image_size=16, cache="memory", train=True, seed=0)
    seed_augmentation(ds, 123)
    a = ds[1]["image"]
    ds[1]
    seed_augmentation(ds, 123)
    assert torch.equal(ds[1]["image"], a)
    seed_augmentation(ds, 124)
    assert not torch.equal(ds[1]["image"], a)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_reproducible_for_a_seed(painted, workers):
    root, rows = painted
    rows = pd.concat([rows] * 4, ignore_index=True)

    def batches(seed: int) -> list[dict]:
        ds = build_dataset(rows, root, image_size=16, train=True, seed=seed)
        return list(make_loader(ds, 4, shuffle=True, workers=workers, seed=seed))

    a, b, c = batches(0), batches(0), batches(1)
    assert len(a) == 4 and a[0]["image"].shape == (4, 3, 16, 16) and len(a[0]["frame_id"]) == 4
    assert a[0]["size_class3"].dtype == torch.int64 and a[0]["box"].shape == (4, 4)
    assert all(torch.equal(x["image"], y["image"]) and x["frame_id"] == y["frame_id"] for x, y in zip(a, b))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_unreadable_frame_raises_naming_the_path(painted, tmp_path):
    root, rows = painted
    bad = rows.iloc[[0, 1]].copy()
    bad["frame_path"] = ["missing/none.jpg", "corrupt.jpg"]
    (root / "corrupt.jpg").write_bytes(b"not a jpeg")
    ds = build_dataset(bad, root, cache="none")
    with pytest.raises(FsgEndoError, match=r"cannot read frame .*missing/none\.jpg: file missing"):
        ds[0]
    with pytest.raises(FsgEndoError, match=r"cannot read frame .*corrupt\.jpg: not a decodable image"):
        ds[1]
    with pytest.raises(FsgEndoError, match=r"missing/none\.jpg"):
        build_dataset(bad, root, cache="memory")
    with pytest.raises(FsgEndoError, match=r"cannot read video .*videos/001-001\.mp4: file missing"):
        build_dataset(bad, root, cache="none", source="video")[0]


def test_frame_size_mismatch_is_reported(painted):
    root, rows = painted
    wrong = rows.iloc[[0]].assign(width=100)
    with pytest.raises(FsgEndoError, match=r"001-001_0\.png: frame is 96x72 but the manifest says 100x72"):
        build_dataset(wrong, root, cache="none")[0]


def sampler_rows(frames: list[int], sizes: list[float]) -> pd.DataFrame:
    """Lesion ``k`` has ``frames[k]`` rows and size ``sizes[k]``; rows interleaved across lesions."""
    lesions = [(f"L{k}", s) for k, (n, s) in enumerate(zip(frames, sizes)) for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(lesions))
    return pd.DataFrame([{"lesion_id": lesions[i][0], "size_mm": lesions[i][1]} for i in order])


def test_sampler_draws_n_frames_per_lesion():
    rows = sampler_rows([100, 5, 40], [3.0, 7.0, 12.0])
    sampler = LesionFrameSampler(rows, frames_per_lesion=10, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 30
    drawn = rows.iloc[indices]
    assert drawn["lesion_id"].value_counts().to_dict() == {"L0": 10, "L1": 10, "L2": 10}
    for lesion in ("L0", "L2"):  # enough frames: drawn without replacement
        assert not drawn.index[drawn["lesion_id"] == lesion].duplicated().any()


def test_sampler_is_a_function_of_seed_and_epoch():
    rows = sampler_rows([30, 20, 25], [3.0, 7.0, 12.0])
    sampler = LesionFrameSampler(rows, frames_per_lesion=8, seed=4)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    resumed = LesionFrameSampler(rows, frames_per_lesion=8, seed=4)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1
    assert list(LesionFrameSampler(rows, frames_per_lesion=8, seed=5)) != epoch0


def test_class_balanced_sampling_equalises_classes():
    sizes = [2.0] * 6 + [7.0] * 2 + [15.0]  # 6 diminutive, 2 small, 1 large lesions
    rows = sampler_rows([12] * 9, sizes)
    classes = size_class3(rows["size_mm"].to_numpy())
    plain = np.bincount(classes[list(LesionFrameSampler(rows, frames_per_lesion=4))], minlength=3)
    assert plain.tolist() == [24, 8, 4]
    balanced = LesionFrameSampler(rows, frames_per_lesion=4, class_balanced=True, seed=1)
    for epoch in range(3):
        balanced.set_epoch(epoch)
        indices = list(balanced)
        assert len(indices) == len(balanced)
        assert np.bincount(classes[indices], minlength=3).tolist() == [12, 12, 12]


def test_sampler_replicas_partition_the_epoch():
    rows = sampler_rows([7, 9, 11], [3.0, 7.0, 12.0])
    full = LesionFrameSampler(rows, frames_per_lesion=5, seed=2)
    parts = [list(LesionFrameSampler(rows, frames_per_lesion=5, seed=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 8
    merged = [i for pair in zip(*parts) for i in pair]
    assert merged[:15] == list(full) and merged[15] == merged[0]
