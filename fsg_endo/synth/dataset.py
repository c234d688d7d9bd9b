"""Synthetic colonoscopy dataset in the REAL-Colon layout (docs/interfaces.md#data-layouts), generated and cached.

``generate_dataset`` renders videos in parallel into a temporary folder beside the target and renames
it at the end, so a dataset root is either complete or absent. ``ensure_synthetic`` reuses a complete
dataset generated with the same parameters (``synthetic.json``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from filelock import FileLock
from tqdm import tqdm

from fsg_endo.data.sizes import CLASS3_NAMES, size_class3
from fsg_endo.errors import FsgEndoError
from fsg_endo.synth.video import VideoSpec, render_video

GENERATOR_VERSION = 2
DEFAULT_VIDEOS = 36
DEFAULT_IMAGE_SIZE = 256
SITES = 4
LESIONS_PER_VIDEO = (3, 5)
FRAMES_PER_LESION_SLOT = 30  # a fixed frame budget fits at most this many frames per lesion
META_FILE = "synthetic.json"


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the generated files (compared by ``ensure_synthetic``)."""

    n_videos: int
    seed: int
    frames_per_video: int | None
    width: int
    height: int
    lesions_per_video: tuple[int, int] = LESIONS_PER_VIDEO
    sites: int = SITES
    fps: int = 10
    jpeg_quality: int = 90
    version: int = GENERATOR_VERSION


def resolve_params(
    n_videos: int | None = None,
    seed: int = 0,
    frames_per_video: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> SynthParams:
    """Check the user's parameters and fill in the defaults of the standard dataset."""
    n_videos = DEFAULT_VIDEOS if n_videos is None else n_videos
    if not isinstance(n_videos, (int, np.integer)) or n_videos < 1:
        raise FsgEndoError(f"synthetic: n_videos must be a positive integer, got {n_videos!r}")
    if frames_per_video is not None and (not isinstance(frames_per_video, (int, np.integer)) or frames_per_video < 10):
        raise FsgEndoError(f"synthetic: frames_per_video must be an integer >= 10, got {frames_per_video!r}")
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    width, height = (size, size) if np.isscalar(size) else tuple(size)
    if min(width, height) < 64:
        raise FsgEndoError(f"synthetic: image_size must be at least 64 pixels, got {image_size!r}")
    return SynthParams(
        int(n_videos), int(seed), None if frames_per_video is None else int(frames_per_video), int(width), int(height)
    )


def video_specs(params: SynthParams) -> list[VideoSpec]:
    """One spec per video: name ``{site}-{video}`` (sites in turn), seed and lesion count from the dataset seed."""
    specs = []
    for i in range(params.n_videos):
        seed = int(np.random.SeedSequence([params.seed, i]).generate_state(1)[0])
        lesions = int(
            np.random.default_rng(seed).integers(params.lesions_per_video[0], params.lesions_per_video[1] + 1)
        )
        if params.frames_per_video:
            lesions = int(np.clip(params.frames_per_video // FRAMES_PER_LESION_SLOT, 1, lesions))
        site = i % params.sites
        specs.append(
            VideoSpec(
                name=f"{site + 1:03d}-{i // params.sites + 1:03d}",
                site=site,
                seed=seed,
                width=params.width,
                height=params.height,
                frames=params.frames_per_video,
                lesions=lesions,
                fps=params.fps,
                jpeg_quality=params.jpeg_quality,
            )
        )
    return specs


def generate_dataset(
    out: str | os.PathLike,
    n_videos: int | None = None,
    seed: int = 0,
    *,
    frames_per_video: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write a synthetic dataset to ``out`` (replacing a previous synthetic dataset there); return ``out``.

    Same parameters and seed give byte-identical frames, annotations and tables. ``workers``
    processes render videos in parallel (default: one per CPU core).
    """
    params = resolve_params(n_videos, seed, frames_per_video, image_size)
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        results = _render_all(video_specs(params), tmp, progress, workers)
        lesions, videos = _write_tables(tmp, results)
        meta = {"generator": "fsg_endo.synth.dataset", "params": asdict(params), "summary": summary(lesions, videos)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_synthetic(root: str | os.PathLike, n_videos: int | None = None, seed: int = 0, **kw: Any) -> Path:
    """``root`` if it holds a complete dataset made with these parameters, else (re)generate it there.

    Under a file lock beside ``root``: concurrent runs on one node (a parallel sweep) generate it once.
    """
    root = Path(root)
    params = resolve_params(n_videos, seed, kw.get("frames_per_video"), kw.get("image_size"))
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):
        if is_complete(root, params):
            return root
        return generate_dataset(root, n_videos, seed, **kw)


def is_complete(root: Path, params: SynthParams) -> bool:
    """Whether ``root`` holds every file of a dataset generated with ``params``."""
    try:
        meta = json.loads((root / META_FILE).read_text())
        videos = pd.read_csv(root / "video_info.csv", dtype={"unique_video_name": str})
    except (OSError, ValueError):
        return False
    if meta.get("params") != json.loads(json.dumps(asdict(params))) or len(videos) != params.n_videos:
        return False
    for name, n in zip(videos["unique_video_name"], videos["num_frames"]):
        frames, ann = root / f"{name}_frames", root / f"{name}_annotations"
        if not (frames.is_dir() and ann.is_dir() and (root / "videos" / f"{name}.mp4").is_file()):
            return False
        if len(os.listdir(frames)) != n or len(os.listdir(ann)) != n:
            return False
    return (root / "lesion_info.csv").is_file()


def summary(lesions: pd.DataFrame, videos: pd.DataFrame) -> dict:
    """Counts and size-class shares of a generated dataset (also recorded in ``synthetic.json``)."""
    classes = size_class3(lesions["size [mm]"].to_numpy())
    per_lesion = lesions["num_frames"].to_numpy()
    return {
        "videos": int(len(videos)),
        "frames": int(videos["num_frames"].sum()),
        "lesions": int(len(lesions)),
        "lesion_boxes": int(per_lesion.sum()),
        "class_share": {name: round(float(np.mean(classes == k)), 4) for k, name in enumerate(CLASS3_NAMES)},
        "frames_per_lesion": {
            "min": int(per_lesion.min()),
            "median": float(np.median(per_lesion)),
            "max": int(per_lesion.max()),
        },
    }


def _render_task(task: tuple[VideoSpec, Path]) -> dict:
    return render_video(*task)


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _render_all(specs: list[VideoSpec], root: Path, progress: bool, workers: int | None) -> list[dict]:
    """Render every video (in worker processes when more than one) with a progress bar over videos."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(specs)))
    tasks = [(spec, root) for spec in specs]
    with tqdm(total=len(specs), desc="synthetic videos", unit="video", disable=not progress) as bar:
        if workers == 1:
            return [_tick(bar, _render_task(task)) for task in tasks]
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            return [_tick(bar, result) for result in pool.imap(_render_task, tasks)]


def _tick(bar: tqdm, result: dict) -> dict:
    bar.update()
    return result


def _write_tables(root: Path, results: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``lesion_info.csv`` and ``video_info.csv`` of the REAL-Colon layout, sorted by video name."""
    videos = pd.DataFrame([r["video"] for r in results]).sort_values("unique_video_name", kind="stable")
    lesions = pd.DataFrame([row for r in results for row in r["lesions"]])
    order = lesions["unique_object_id"].str.rsplit("_", n=1).str[1].astype(int)
    lesions = lesions.assign(_k=order).sort_values(["unique_video_name", "_k"], kind="stable").drop(columns="_k")
    videos.to_csv(root / "video_info.csv", index=False)
    lesions.to_csv(root / "lesion_info.csv", index=False)
    return lesions, videos


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything but a previous synthetic dataset or an empty folder."""
    if out.exists() and not out.is_dir():
        raise FsgEndoError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise FsgEndoError(f"{out}: folder is not empty and holds no synthetic dataset ({META_FILE}); not replacing it")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished dataset onto ``out``; an old dataset there is removed only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
