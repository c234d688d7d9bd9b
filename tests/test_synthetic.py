"""Synthetic colonoscopy generator: REAL-Colon layout, annotations, determinism, camera physics, caching."""

from __future__ import annotations

import filecmp
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fsg_endo.data.sizes import size_class3
from fsg_endo.errors import FsgEndoError
from fsg_endo.synth import dataset as synthetic
from fsg_endo.synth.dataset import ensure_synthetic, generate_dataset
from fsg_endo.synth.render import Camera, Optics, Renderer, look_at
from fsg_endo.synth.scene import SCALE_RANGE, Patient, Polyp, build_wall, sample_patient
from fsg_endo.synth.video import HISTOLOGY_LOOK, lesion_boxes, sample_optics, sample_polyps, sample_sizes

SIZE = 128
TINY = dict(n_videos=2, frames_per_video=30, image_size=SIZE, progress=False, workers=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", seed=0, **TINY)


def read_objects(xml_path: Path) -> tuple[ET.Element, list[dict]]:
    root = ET.parse(xml_path).getroot()
    objects = []
    for obj in root.findall("object"):
        box = {k: int(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")}
        objects.append(
            {
                "name": obj.find("name").text,
                "unique_id": obj.find("unique_id").text,
                "box_id": obj.find("box_id").text,
                **box,
            }
        )
    return root, objects


def data_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in {".jpg", ".xml", ".csv", ".json"})


def test_layout_is_realcolon(tiny: Path) -> None:
    videos = pd.read_csv(tiny / "video_info.csv", dtype={"unique_video_name": str})
    assert {"unique_video_name", "fps", "num_frames", "endoscope_brand"} <= set(videos.columns)
    assert len(videos) == 2 and (videos["num_frames"] == 30).all()
    expected = {"lesion_info.csv", "video_info.csv", "synthetic.json", "videos"}
    for name in videos["unique_video_name"]:
        assert re.fullmatch(r"\d{3}-\d{3}", name)
        expected |= {f"{name}_frames", f"{name}_annotations"}
        assert {p.name for p in (tiny / f"{name}_frames").iterdir()} == {f"{name}_{t}.jpg" for t in range(30)}
        assert {p.name for p in (tiny / f"{name}_annotations").iterdir()} == {f"{name}_{t}.xml" for t in range(30)}
        assert (tiny / "videos" / f"{name}.mp4").is_file()
    assert {p.name for p in tiny.iterdir()} == expected
    assert not list(tiny.parent.glob(".ds.*")), "temporary folders left behind"


def test_annotations_match_lesion_info(tiny: Path) -> None:
    lesions = pd.read_csv(tiny / "lesion_info.csv", dtype={"unique_video_name": str, "site": str})
    assert {"unique_object_id", "unique_video_name", "size [mm]", "site", "histology_class"} <= set(lesions.columns)
    assert lesions["size [mm]"].between(1.0, 20.0).all()
    video_of = dict(zip(lesions["unique_object_id"], lesions["unique_video_name"]))
    counts = {lesion: 0 for lesion in video_of}
    positives = negatives = 0
    for xml_path in sorted(tiny.glob("*_annotations/*.xml")):
        root, objects = read_objects(xml_path)
        assert root.tag == "annotation" and root.findtext("filename") == xml_path.stem + ".jpg"
        assert [int(root.findtext(f"size/{k}")) for k in ("width", "height", "depth")] == [SIZE, SIZE, 3]
        video = xml_path.stem.rsplit("_", 1)[0]
        for obj in objects:
            assert obj["name"] == "lesion" and video_of[obj["unique_id"]] == video
            assert 0 <= obj["xmin"] < obj["xmax"] <= SIZE and 0 <= obj["ymin"] < obj["ymax"] <= SIZE
            assert min(obj["xmax"] - obj["xmin"], obj["ymax"] - obj["ymin"]) >= 6
            counts[obj["unique_id"]] += 1
        positives += bool(objects)
        negatives += not objects
    assert positives > 0 and negatives > 0
    assert counts == dict(zip(lesions["unique_object_id"], lesions["num_frames"]))


def test_video_frames_equal_jpeg_frames(tiny: Path) -> None:
    name = "001-001"
    capture = cv2.VideoCapture(str(tiny / "videos" / f"{name}.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame.astype(float))
    capture.release()
    assert len(frames) == 30 and frames[0].shape == (SIZE, SIZE, 3)
    jpegs = [cv2.imread(str(tiny / f"{name}_frames" / f"{name}_{t}.jpg")).astype(float) for t in range(30)]
    for t in (0, 14, 29):
        same = np.abs(frames[t] - jpegs[t]).mean()
        assert same < 6.0
        assert same < min(np.abs(frames[t] - jpegs[u]).mean() for u in range(30) if abs(u - t) > 3)


def test_same_seed_same_bytes_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", seed=0, **TINY)
    files = data_files(tiny)
    assert files == data_files(again)
    match, mismatch, errors = filecmp.cmpfiles(tiny, again, files, shallow=False)
    assert not mismatch and not errors
    other = generate_dataset(tmp_path / "other", seed=1, **TINY)
    assert (other / "lesion_info.csv").read_bytes() != (tiny / "lesion_info.csv").read_bytes()
    assert (other / "001-001_frames" / "001-001_0.jpg").read_bytes() != (
        tiny / "001-001_frames" / "001-001_0.jpg"
    ).read_bytes()


def test_worker_processes_give_the_same_dataset(tiny: Path, tmp_path: Path) -> None:
    parallel = generate_dataset(tmp_path / "parallel", seed=0, **{**TINY, "workers": 2})
    files = data_files(tiny)
    _, mismatch, errors = filecmp.cmpfiles(tiny, parallel, files, shallow=False)
    assert data_files(parallel) == files and not mismatch and not errors


def _single_polyp_wall(size_mm: float, height_mm: float):
    patient = Patient(
        radius_mm=20.0,
        mucosa=(0.12, 0.22, 0.85),
        vessel=(0.05, 0.04, 0.35),
        vessel_contrast=0.8,
        fold_height_mm=3.0,
        fold_spacing_mm=30.0,
    )
    polyp = Polyp("000-000_1", size_mm, 60.0, 1.0, height_mm, 1.0, 0.0, (0.2, 0.3, 0.9))
    return build_wall(np.random.default_rng(0), patient, 0.0, 200.0, [polyp]), polyp


@pytest.mark.parametrize("near", [8.0, 12.0])
def test_box_shrinks_and_darkens_with_distance(near: float) -> None:
    size, height = 6.0, 2.0
    wall, polyp = _single_polyp_wall(size, height)
    camera = Camera(256, 256)
    apex = wall.surface(polyp.z, polyp.theta)[0]
    inward = -np.array([apex[0], apex[1], 0.0]) / np.hypot(apex[0], apex[1])
    seen = {}
    for distance in (near, 2 * near):
        pose = look_at(apex + distance * inward, apex)
        frame = Renderer(camera, wall, Optics()).render(pose, np.random.default_rng(0))
        [(index, (x0, y0, x1, y1))] = lesion_boxes(frame, camera, pose, wall, [polyp], camera.fov_mask())
        mask = frame.polyp > 0.5
        seen[distance] = (x1 - x0, y1 - y0, frame.image[mask].mean())
    # Face-on pinhole at the image centre: apparent diameter = focal * size / distance to the base.
    for d in (near, 2 * near):
        assert seen[d][0] == pytest.approx(camera.focal * size / (d + height), rel=0.12)
    ratio = (2 * near + height) / (near + height)
    assert seen[near][0] / seen[2 * near][0] == pytest.approx(ratio, rel=0.1)
    assert seen[near][1] / seen[2 * near][1] == pytest.approx(ratio, rel=0.1)
    assert seen[near][2] > seen[2 * near][2] + 5


def test_sizes_follow_clinical_shares() -> None:
    sizes = sample_sizes(np.random.default_rng(0), 20000)
    assert sizes.min() >= 1.0 and sizes.max() <= 20.0
    assert np.allclose(sizes, np.round(sizes, 1))
    shares = np.bincount(size_class3(sizes), minlength=3) / sizes.size
    assert shares == pytest.approx([0.55, 0.30, 0.15], abs=0.03)
    for threshold in (5.0, 10.0):
        assert np.any(sizes == threshold) and np.any(np.abs(sizes - threshold - 0.1) < 1e-9)


def test_ensure_reuses_complete_and_regenerates_changed(tmp_path: Path) -> None:
    root, params = tmp_path / "cache", dict(n_videos=1, frames_per_video=12, image_size=96, progress=False, workers=1)
    ensure_synthetic(root, seed=0, **params)
    stamp = (root / "lesion_info.csv").stat().st_mtime_ns
    assert ensure_synthetic(root, seed=0, **params) == root
    assert (root / "lesion_info.csv").stat().st_mtime_ns == stamp
    ensure_synthetic(root, seed=3, **params)
    assert json.loads((root / "synthetic.json").read_text())["params"]["seed"] == 3
    missing = root / "001-001_frames" / "001-001_5.jpg"
    missing.unlink()
    ensure_synthetic(root, seed=3, **params)
    assert missing.is_file()


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FsgEndoError, match="not replacing"):
        generate_dataset(tmp_path / "mine", n_videos=1, frames_per_video=10, image_size=64, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_failure_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(spec, root):
        if calls:
            raise RuntimeError("renderer crashed")
        calls.append(spec)
        return real(spec, root)

    real = synthetic.render_video
    monkeypatch.setattr(synthetic, "render_video", failing)
    with pytest.raises(RuntimeError):
        generate_dataset(tmp_path / "ds", **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [dict(n_videos=0), dict(image_size=16), dict(frames_per_video=3)])
def test_bad_parameters_are_user_errors(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(FsgEndoError):
        generate_dataset(tmp_path / "ds", progress=False, **kwargs)


def test_manifest_reader_reads_the_synthetic_layout(tiny: Path) -> None:
    from fsg_endo.data.manifest import build_manifest

    df = build_manifest("synthetic", tiny, folds=2)
    lesions = pd.read_csv(tiny / "lesion_info.csv")
    assert len(df) == lesions["num_frames"].sum()
    sizes = dict(zip(lesions["unique_object_id"], lesions["size [mm]"]))
    assert np.allclose(df["size_mm"], df["lesion_id"].map(sizes))


def test_videos_differ_in_texture_scale_and_calibre(tiny: Path) -> None:
    videos = pd.read_csv(tiny / "video_info.csv")
    for column in ("texture_scale", "vessel_calibre"):
        assert videos[column].between(*SCALE_RANGE).all() and videos[column].nunique() == len(videos)
    draws = np.array(
        [[p.texture_scale, p.vessel_calibre] for p in (sample_patient(np.random.default_rng(s)) for s in range(400))]
    )
    # log-uniform over the whole range: log quartiles where a log-uniform draw puts them
    quartiles = np.quantile(np.log(draws), [0.25, 0.5, 0.75], axis=0)
    expected = np.log(SCALE_RANGE[0]) + np.array([0.25, 0.5, 0.75]) * np.log(SCALE_RANGE[1] / SCALE_RANGE[0])
    assert np.allclose(quartiles, expected[:, None], atol=0.06)
    assert abs(np.corrcoef(draws.T)[0, 1]) < 0.2  # calibre and scale are drawn independently


def _mucosa_gradient_energy(texture_scale: float) -> float:
    """Mean squared gradient of a wall's albedo without polyps: larger for finer texture."""
    patient = Patient(
        radius_mm=20.0,
        mucosa=(0.12, 0.22, 0.85),
        vessel=(0.05, 0.04, 0.35),
        vessel_contrast=0.8,
        fold_height_mm=3.0,
        fold_spacing_mm=30.0,
        texture_scale=texture_scale,
    )
    albedo = build_wall(np.random.default_rng(0), patient, 0.0, 60.0, []).albedo[..., 2].astype(float)
    return float(np.mean(np.diff(albedo, axis=0) ** 2) + np.mean(np.diff(albedo, axis=1) ** 2))


def test_texture_scale_changes_the_rendered_mucosa() -> None:
    fine, coarse = _mucosa_gradient_energy(SCALE_RANGE[0]), _mucosa_gradient_energy(SCALE_RANGE[1])
    assert fine > 1.5 * coarse  # half the texel spacing: about 4x the gradient energy in theory


def test_polyps_vary_within_each_histology() -> None:
    patient = sample_patient(np.random.default_rng(0))
    polyps = [p for s in range(60) for p in sample_polyps(np.random.default_rng(s), "001-001", 5, patient)]
    for histology, look in HISTOLOGY_LOOK.items():
        group = [p for p in polyps if p.histology == histology]
        assert len(group) >= 5, histology
        pit = np.array([p.pit_mm for p in group]) / look[3]
        assert pit.min() >= SCALE_RANGE[0] - 1e-9 and pit.max() <= SCALE_RANGE[1] + 1e-9
        assert np.log(pit).std() > 0.1  # a real spread, not one pit scale per histology
        lines = np.array([p.pit_lines for p in group])
        assert look[4][0] <= lines.min() and lines.max() <= look[4][1] and lines.std() > 0.05
        colours = np.array([p.color for p in group])
        assert (colours.std(axis=0) / colours.mean(axis=0) > 0.05).all()


def test_videos_differ_in_light_and_exposure() -> None:
    optics = [sample_optics(np.random.default_rng(s), site=0) for s in range(50)]
    for name, low, high in (
        ("reference_mm", 14.0, 28.0),
        ("exposure_strength", 0.5, 0.9),
        ("exposure_target", 0.25, 0.45),
        ("vignetting", 1.0, 2.0),
    ):
        values = np.array([getattr(o, name) for o in optics])
        assert values.min() >= low and values.max() <= high and values.std() > 0.1 * (high - low), name
