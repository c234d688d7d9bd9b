"""One synthetic colonoscopy video: lesions, colon, camera path, frames and boxes, in the REAL-Colon layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fsg_endo.errors import FsgEndoError
from fsg_endo.synth.camera_path import CameraPath, plan_path
from fsg_endo.synth.render import Camera, Frame, Optics, Pose, Renderer
from fsg_endo.synth.scene import (
    SCALE_RANGE,
    Patient,
    Polyp,
    Wall,
    build_wall,
    log_uniform,
    polyp_points,
    sample_patient,
)

SIZE_LOGNORMAL = (1.513, 0.762)  # median 4.5 mm; ~55 % <= 5 mm, ~15 % >= 10 mm
SIZE_RANGE_MM = (1.0, 20.0)
MIN_BOX_PX = 6
MIN_VISIBLE_SHARE = 0.5  # of the polyp's projected outline; less (FOV edge, occluded) is not annotated
MIN_BRIGHTNESS = 40  # mean 8-bit intensity; darker polyps (deep in the dark lumen) are not annotated
EXPOSURE_SHARE = 0.5  # of the frame interval: image motion during it becomes motion blur
# Per histology: range of the blue/green tint relative to the mucosa (low: redder), dome height / radius,
# median pit cell (mm) and the range of the surface pattern (0 round pits ... 1 gyrus-like lines).
HISTOLOGY_LOOK = {
    "AD": (0.6, 0.95, 0.85, 0.6, (0.3, 1.0)),
    "HP": (1.05, 1.4, 0.6, 0.45, (0.0, 0.5)),
    "SSL": (0.95, 1.25, 0.45, 0.8, (0.0, 0.7)),
}
SITE_WHITE_BALANCE = ((1.0, 1.0, 1.0), (1.06, 0.98, 0.96), (0.95, 1.02, 1.04), (1.02, 0.95, 1.03))


@dataclass(frozen=True)
class VideoSpec:
    """What to generate for one video; ``seed`` is its own entropy, derived from the dataset seed."""

    name: str
    site: int
    seed: int
    width: int
    height: int
    frames: int | None
    lesions: int
    fps: int
    jpeg_quality: int


def sample_sizes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Polyp diameters (mm, 0.1 mm steps): log-normal truncated to [1, 20] mm, like clinical series."""
    out = np.empty(0)
    while out.size < n:
        draw = np.round(np.exp(rng.normal(*SIZE_LOGNORMAL, size=2 * n)), 1)
        out = np.concatenate([out, draw[(draw >= SIZE_RANGE_MM[0]) & (draw <= SIZE_RANGE_MM[1])]])
    return out[:n]


def sample_polyps(rng: np.random.Generator, video: str, n: int, patient: Patient) -> list[Polyp]:
    """``n`` polyps along the colon, 50-90 mm apart, each with its own shape, histology and colour."""
    z = 100.0 + np.cumsum(rng.uniform(50.0, 90.0, n)) - 50.0
    polyps = []
    for k, (size, zk) in enumerate(zip(sample_sizes(rng, n), z), start=1):
        histology = _histology(rng, size)
        low, high, flatness, pit_mm, lines = HISTOLOGY_LOOK[histology]
        tint = np.array([rng.uniform(low, high), rng.uniform(low, high), rng.uniform(0.95, 1.1)])
        tint *= rng.uniform(0.85, 1.15)  # lighter or darker lesions of the same hue
        polyps.append(
            Polyp(
                lesion_id=f"{video}_{k}",
                size_mm=float(size),
                z=float(zk),
                theta=float(rng.uniform(0, 2 * np.pi)),
                height_mm=float(size / 2 * flatness * rng.uniform(0.6, 1.0)),
                aspect=float(rng.uniform(0.75, 1.0)),
                orientation=float(rng.uniform(0, np.pi)),
                color=tuple(np.asarray(patient.mucosa) * tint),
                histology=histology,
                pit_mm=pit_mm * log_uniform(rng, *SCALE_RANGE),
                pit_contrast=float(rng.uniform(0.1, 0.3)),
                pit_lines=float(rng.uniform(*lines)),
            )
        )
    return polyps


def _histology(rng: np.random.Generator, size_mm: float) -> str:
    """Adenoma, hyperplastic or sessile serrated; adenomas grow commoner with size."""
    if rng.uniform() < min(0.9, 0.5 + 0.03 * size_mm):
        return "AD"
    return "SSL" if rng.uniform() < 0.3 else "HP"


def sample_optics(rng: np.random.Generator, site: int) -> Optics:
    """Light, exposure and lens of one video; the white balance is the site's endoscope processor.

    Light power, vignetting and the auto-exposure's target and strength differ between videos, so the
    brightness at a given distance is no fixed ruler either.
    """
    return Optics(
        gain=float(rng.uniform(0.85, 1.15)),
        white_balance=SITE_WHITE_BALANCE[site % len(SITE_WHITE_BALANCE)],
        reference_mm=log_uniform(rng, 14.0, 28.0),
        vignetting=float(rng.uniform(1.0, 2.0)),
        exposure_target=float(rng.uniform(0.25, 0.45)),
        exposure_strength=float(rng.uniform(0.5, 0.9)),
        specular=float(rng.uniform(0.4, 0.8)),
        shininess=float(rng.uniform(150.0, 400.0)),
        focus_mm=float(rng.uniform(15.0, 30.0)),
        defocus=float(rng.uniform(0.4, 0.8)),
    )


def image_motion(camera: Camera, previous: Pose, depth: np.ndarray, pose: Pose) -> np.ndarray:
    """Image motion (dx, dy) in pixels during one exposure, from the scene points of the previous frame."""
    cx, cy = camera.center
    offsets = np.array([-0.4, 0.0, 0.4]) * camera.radius
    u, v = np.meshgrid(np.round(cx + offsets).astype(int), np.round(cy + offsets).astype(int))
    u, v = u.ravel(), v.ravel()
    rays = camera.rays()[:, v, u]
    points = previous.origin + (previous.rotation @ rays).T * depth[v, u, None]
    moved = camera.project(pose.to_camera(points)) - np.stack([u, v], axis=1)
    moved = moved[np.all(np.isfinite(moved), axis=1)]
    return EXPOSURE_SHARE * moved.mean(axis=0) if len(moved) else np.zeros(2)


def projected_area(camera: Camera, pose: Pose, wall: Wall, polyp: Polyp) -> float:
    """Area (px^2) of the convex hull of the polyp's projection, ignoring the frame and FOV; inf if behind."""
    uv = camera.project(pose.to_camera(polyp_points(wall, polyp)))
    if not np.all(np.isfinite(uv)):
        return float("inf")
    return float(cv2.contourArea(cv2.convexHull(uv.astype(np.float32))))


def lesion_boxes(
    frame: Frame, camera: Camera, pose: Pose, wall: Wall, polyps: list[Polyp], fov: np.ndarray
) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(polyp index, box) of every polyp visible enough: tight box (xmin, ymin, xmax+1, ymax+1) in pixels."""
    covered = np.flatnonzero((frame.polyp > 0.3) & (fov > 0.5))
    hit_z = frame.hit_z.ravel()[covered]
    boxes = []
    for k, polyp in enumerate(polyps):
        pixels = covered[np.abs(hit_z - polyp.z) < polyp.size_mm / 2 + 1.0]
        if pixels.size < MIN_BOX_PX * MIN_BOX_PX // 2:
            continue
        ys, xs = np.divmod(pixels, camera.width)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if min(box[2] - box[0], box[3] - box[1]) < MIN_BOX_PX:
            continue
        if frame.image.reshape(-1, 3)[pixels].mean() < MIN_BRIGHTNESS:
            continue
        if pixels.size < MIN_VISIBLE_SHARE * projected_area(camera, pose, wall, polyp):
            continue
        boxes.append((k, box))
    return boxes


def voc_xml(video: str, t: int, width: int, height: int, objects: list[tuple[str, int, tuple]]) -> str:
    """Pascal-VOC annotation of one frame in the REAL-Colon flavour (``unique_id``, ``box_id``)."""
    parts = [
        f"<annotation>\n\t<folder>{video}_frames</folder>\n\t<filename>{video}_{t}.jpg</filename>\n"
        f"\t<source>\n\t\t<database>fsg_endo synthetic</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n"
        f"\t</size>\n\t<segmented>0</segmented>\n"
    ]
    for lesion_id, box_id, (x0, y0, x1, y1) in objects:
        parts.append(
            f"\t<object>\n\t\t<name>lesion</name>\n\t\t<unique_id>{lesion_id}</unique_id>\n"
            f"\t\t<box_id>{box_id}</box_id>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
            f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
            f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        )
    parts.append("</annotation>\n")
    return "".join(parts)


@dataclass
class Scene:
    """Everything drawn for one video before rendering."""

    patient: Patient
    polyps: list[Polyp]
    wall: Wall
    path: CameraPath
    optics: Optics


def build_scene(spec: VideoSpec, camera: Camera) -> tuple[Scene, np.random.Generator]:
    """Patient, polyps, colon wall, camera path and optics of one video, and the rng of its frames."""
    scene_rng, path_rng, optics_rng, frame_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(4)
    )
    patient = sample_patient(scene_rng)
    polyps = sample_polyps(scene_rng, spec.name, spec.lesions, patient)
    wall = build_wall(scene_rng, patient, polyps[0].z - 80.0, polyps[-1].z + 150.0, polyps)
    path = plan_path(path_rng, wall, polyps, camera.focal, spec.frames)
    return Scene(patient, polyps, wall, path, sample_optics(optics_rng, spec.site)), frame_rng


def _video_writer(path: Path, spec: VideoSpec) -> cv2.VideoWriter:
    path.parent.mkdir(exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), spec.fps, (spec.width, spec.height))
    if not writer.isOpened():
        raise FsgEndoError(f"{path}: OpenCV cannot write mp4 (codec mp4v unavailable)")
    return writer


def render_video(spec: VideoSpec, root: Path) -> dict:
    """Write one video's frames, annotations and mp4 under ``root``; return its video and lesion records."""
    camera = Camera(spec.width, spec.height)
    scene, rng = build_scene(spec, camera)
    renderer = Renderer(camera, scene.wall, scene.optics, noise_seed=int(rng.integers(2**31)))
    fov = camera.fov_mask()
    frames_dir, ann_dir = root / f"{spec.name}_frames", root / f"{spec.name}_annotations"
    frames_dir.mkdir()
    ann_dir.mkdir()
    writer = _video_writer(root / "videos" / f"{spec.name}.mp4", spec)
    seen = {p.lesion_id: [] for p in scene.polyps}
    box_id, previous = 0, None
    try:
        for t in range(len(scene.path)):
            pose = scene.path.pose(t)
            motion = None if previous is None else image_motion(camera, previous[0], previous[1].depth, pose)
            frame = renderer.render(pose, rng, motion)
            objects = []
            for k, box in lesion_boxes(frame, camera, pose, scene.wall, scene.polyps, fov):
                box_id += 1
                objects.append((scene.polyps[k].lesion_id, box_id, box))
                seen[scene.polyps[k].lesion_id].append(t)
            name = f"{spec.name}_{t}"
            cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])[1].tofile(
                frames_dir / f"{name}.jpg"
            )
            (ann_dir / f"{name}.xml").write_text(voc_xml(spec.name, t, spec.width, spec.height, objects))
            writer.write(frame.image)
            previous = (pose, frame)
    finally:
        writer.release()
    return {
        "video": _video_record(spec, len(scene.path), scene.patient),
        "lesions": [_lesion_record(spec, p, seen[p.lesion_id]) for p in scene.polyps],
    }


def _video_record(spec: VideoSpec, n_frames: int, patient: Patient) -> dict:
    return {
        "unique_video_name": spec.name,
        "fps": spec.fps,
        "num_frames": n_frames,
        "endoscope_brand": f"synthetic-{spec.site % len(SITE_WHITE_BALANCE)}",
        "site": f"{spec.site + 1:03d}",
        "width": spec.width,
        "height": spec.height,
        "colon_radius_mm": round(patient.radius_mm, 2),
        "texture_scale": round(patient.texture_scale, 4),
        "vessel_calibre": round(patient.vessel_calibre, 4),
    }


def _lesion_record(spec: VideoSpec, polyp: Polyp, frames: list[int]) -> dict:
    return {
        "unique_object_id": polyp.lesion_id,
        "unique_video_name": spec.name,
        "size [mm]": polyp.size_mm,
        "site": f"{spec.site + 1:03d}",
        "histology_class": polyp.histology,
        "num_frames": len(frames),
        "first_frame": frames[0] if frames else -1,
        "last_frame": frames[-1] if frames else -1,
        "height_mm": round(polyp.height_mm, 2),
        "pit_mm": round(polyp.pit_mm, 3),
    }
