"""Throughput of the training data pipeline (cold and cached, 0 and 2 workers) next to the training step.

Generates a small synthetic dataset (timing the generator), builds its manifest, then times epochs of
the augmented training loader (batch 32, 64 px crops, 40 frames per lesion) and one Gradient Routing
step of the default model (micro ViT with FSG and box features). Medians over repeats, 2 threads:

    python benchmarks/bench_data.py [--videos 4] [--frame-size 256 256] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fsg_endo.data.manifest import build_manifest
from fsg_endo.data.pipeline import build_dataset, compute_mean_std, make_loader
from fsg_endo.data.sampling import LesionFrameSampler
from fsg_endo.data.synthetic import generate_dataset
from fsg_endo.data.transforms import paper_augmentation
from fsg_endo.gates import gate_parameters, non_gate_parameters
from fsg_endo.models import build_model
from fsg_endo.routing import GradientRouter

BATCH, IMAGE_SIZE, FRAMES_PER_LESION = 32, 64, 40


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generate(root: Path, videos: int, frame_size: tuple[int, int]) -> float:
    """Write the synthetic dataset; return frames per second of the generator."""
    seconds = timed(lambda: generate_dataset(root, n_videos=videos, seed=0, image_size=frame_size,
                                             progress=False, workers=2))
    return sum(1 for _ in root.glob("*_frames/*.jpg")) / seconds


def loader_rate(rows, root: Path, cache: str, workers: int, repeats: int, train: bool = True) -> tuple[float, float]:
    """(items/s over the median epoch, seconds to build the dataset incl. a memory cache fill)."""
    mean, std = compute_mean_std(rows, root, image_size=IMAGE_SIZE)
    start = time.perf_counter()
    ds = build_dataset(rows, root, image_size=IMAGE_SIZE, train=train, mean=mean, std=std, cache=cache,
                       workers=2)
    build_s = time.perf_counter() - start
    sampler = LesionFrameSampler(rows, frames_per_lesion=FRAMES_PER_LESION, seed=0)
    loader = make_loader(ds, BATCH, sampler=sampler, workers=workers, seed=0)
    epochs = []
    for epoch in range(repeats + 1):  # epoch 0 warms up (starts the persistent workers)
        sampler.set_epoch(epoch)
        epochs.append(timed(lambda: sum(len(b["frame_id"]) for b in loader)))
    return len(sampler) / statistics.median(epochs[1:]), build_s


def fill_rate(rows, root: Path, source: str, workers: int) -> float:
    """Items/s of filling a memory cache (decode, crop, mask, resize) from JPEG frames or from the mp4s."""
    seconds = timed(lambda: build_dataset(rows, root, image_size=IMAGE_SIZE, cache="memory", source=source,
                                          workers=workers))
    return len(rows) / seconds


def augment_us(repeats: int = 2000) -> float:
    """Median microseconds of the paper's albumentations pipeline on one 64 px uint8 crop."""
    augment = paper_augmentation(seed=0)
    crop = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return 1e6 * statistics.median(timed(lambda: augment(image=crop)) for _ in range(repeats))


def training_rate(steps: int) -> float:
    """Samples/s of one GR step of the default model on a batch of 32 crops with box features."""
    torch.manual_seed(0)
    model = build_model(preset="micro", image_size=IMAGE_SIZE, patch_size=8, num_outputs=1, fsg=True,
                        box_features=4).train()
    main = torch.optim.Adam(non_gate_parameters(model), lr=5e-5, weight_decay=1e-5)
    gates = torch.optim.Adam(gate_parameters(model), lr=1e-4)
    router = GradientRouter(model, main, gates, nn.SmoothL1Loss())
    x, box, y = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randn(BATCH, 4), torch.randn(BATCH, 1)
    times = [timed(lambda: router.step((x, box), y)) for _ in range(steps + 3)][3:]
    return BATCH / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frame-size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        gen_fps = generate(root, args.videos, tuple(args.frame_size))
        rows = build_manifest("synthetic", root, folds=2, seed=0)
        print(f"# {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}")
        print(f"# synthetic {args.videos} videos {args.frame_size[0]}x{args.frame_size[1]}: {len(rows)} rows, "
              f"{rows['lesion_id'].nunique()} lesions; {len(rows['lesion_id'].unique()) * FRAMES_PER_LESION} "
              f"items/epoch; median of {args.repeats} epochs")
        print(f"synthetic generator        {gen_fps:8.1f} frames/s (2 processes)")
        train_sps = training_rate(args.steps)
        print(f"training (micro FSG + GR)  {train_sps:8.1f} samples/s (batch {BATCH}, median of {args.steps})")
        for cache in ("none", "memory"):
            for workers in (0, 2):
                rate, build_s = loader_rate(rows, root, cache, workers, args.repeats)
                label = f"train pipeline {'cached' if cache == 'memory' else 'cold'}, {workers} workers"
                print(f"{label:<34} {rate:8.1f} items/s  {rate / train_sps:5.2f}x training  "
                      f"(dataset build {build_s:.2f} s)")
        rate, _ = loader_rate(rows, root, "memory", 0, args.repeats, train=False)
        print(f"{'eval pipeline cached, 0 workers':<34} {rate:8.1f} items/s")
        print(f"{'albumentations per 64 px crop':<34} {augment_us():8.1f} us")
        for source in ("frames", "video"):
            for workers in (1, 2):
                rates = [fill_rate(rows, root, source, workers) for _ in range(args.repeats)]
                label = f"cache fill from {source}, {workers} thread{'s' * (workers > 1)}"
                print(f"{label:<34} {statistics.median(rates):8.1f} items/s")


if __name__ == "__main__":
    main()
