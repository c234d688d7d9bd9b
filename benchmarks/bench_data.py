"""Throughput of the training data pipeline next to the training step it feeds.

Generates a small synthetic dataset (timing the generator), builds its manifest, then times epochs of
the augmented training loader (batch 32, 40 frames per lesion) interleaved with Gradient Routing steps,
so load drifts on a shared machine hit both alike; ratios are medians of per-round ratios. 2 threads.

At the default 64 px: cold and cached pipelines with 0 and 2 workers against the default model (micro
ViT/8 with FSG and box features). At ``--image-size 384``, the paper profile's data path: the cached
pipeline with 0, 2 and 4 workers against GR steps of the paper's ViT-Ti/16 at 384 px:

    python benchmarks/bench_data.py [--image-size 64] [--videos 4] [--frame-size 256 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from machine import cpu_name
from torch import nn

from fsg_endo.data.augment import PaperAugmentd
from fsg_endo.data.manifest import build_manifest
from fsg_endo.data.pipeline import build_dataset, compute_mean_std, make_loader
from fsg_endo.data.sampling import LesionFrameSampler
from fsg_endo.nn.gates import gate_parameters, non_gate_parameters
from fsg_endo.nn.models import build_model
from fsg_endo.nn.routing import GradientRouter
from fsg_endo.synth.dataset import generate_dataset

BATCH, FRAMES_PER_LESION, STEPS_PER_ROUND = 32, 40, 4
DEFAULT_SIZE = 64  # the default experiment's crops; any other size runs the paper profile's data path
PAPER_WORKERS, PAPER_GR_BATCH, PAPER_STEPS_PER_ROUND = (0, 2, 4), 8, 2  # a ViT-Ti/16 GR step at 384 px takes seconds


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generate(root: Path, videos: int, frame_size: tuple[int, int]) -> float:
    """Write the synthetic dataset; return frames per second of the generator."""
    seconds = timed(
        lambda: generate_dataset(root, n_videos=videos, seed=0, image_size=frame_size, progress=False, workers=2)
    )
    return sum(1 for _ in root.glob("*_frames/*.jpg")) / seconds


def gr_step(image_size: int, preset: str, patch_size: int, batch: int) -> Callable[[], object]:
    """One GR step of a sizing model (FSG, box features) on a random batch, as a callable."""
    torch.manual_seed(0)
    model = build_model(
        preset=preset, image_size=image_size, patch_size=patch_size, num_outputs=1, fsg=True, box_features=4
    ).train()
    main = torch.optim.Adam(non_gate_parameters(model), lr=5e-5, weight_decay=1e-5)
    gates = torch.optim.Adam(gate_parameters(model), lr=1e-4)
    router = GradientRouter(model, main, gates, nn.SmoothL1Loss())
    x, box, y = torch.randn(batch, 3, image_size, image_size), torch.randn(batch, 4), torch.randn(batch, 1)
    return lambda: router.step((x, box), y)


def pipeline_vs_training(
    rows: pd.DataFrame,
    root: Path,
    step: Callable[[], object],
    step_batch: int,
    cache: str,
    workers: int,
    rounds: int,
    image_size: int,
    train: bool = True,
    steps_per_round: int = STEPS_PER_ROUND,
) -> dict[str, float]:
    """Rounds of one loader epoch then ``steps_per_round`` training steps; medians of items/s, samples/s, ratio."""
    mean, std = compute_mean_std(rows, root, image_size=image_size)
    start = time.perf_counter()
    ds = build_dataset(rows, root, image_size=image_size, train=train, mean=mean, std=std, cache=cache, workers=2)
    build_s = time.perf_counter() - start
    sampler = LesionFrameSampler(rows, frames_per_lesion=FRAMES_PER_LESION, seed=0)
    loader = make_loader(ds, BATCH, sampler=sampler, workers=workers, seed=0)
    items, samples = [], []
    for epoch in range(rounds + 1):  # round 0 warms up (starts the persistent workers)
        sampler.set_epoch(epoch)
        items.append(len(sampler) / timed(lambda: sum(len(b["frame_id"]) for b in loader)))
        samples.append(step_batch / statistics.median(timed(step) for _ in range(steps_per_round)))
    items, samples = items[1:], samples[1:]
    return {
        "items_s": statistics.median(items),
        "train_s": statistics.median(samples),
        "ratio": statistics.median(i / s for i, s in zip(items, samples)),
        "build_s": build_s,
    }


def fill_rate(rows: pd.DataFrame, root: Path, source: str, workers: int, image_size: int) -> float:
    """Items/s of filling a memory cache (decode, crop, mask, resize) from JPEG frames or from the mp4s."""
    seconds = timed(
        lambda: build_dataset(rows, root, image_size=image_size, cache="memory", source=source, workers=workers)
    )
    return len(rows) / seconds


def albumentations_augmentation(seed: int = 0):
    """The paper's augmentation in albumentations (what the pipeline ran before ``PaperAugmentd``): the
    baseline of the augmentation timing."""
    return A.Compose(
        [
            A.Rotate(limit=30, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.01, p=1.0),
            A.GaussNoise(std_range=(0.01, 0.01), p=1.0),
        ],
        seed=seed,
        strict=True,
    )


def augment_us(image_size: int, repeats: int = 2000) -> dict[str, float]:
    """Median microseconds per uint8 crop of ``image_size`` of the training augmentation, reseeded per item
    as the pipeline does: ``PaperAugmentd`` against the same steps in albumentations, interleaved."""
    crop = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    ours, reference = PaperAugmentd("image"), albumentations_augmentation()

    def run_ours(seed: int) -> None:
        ours.set_random_state(seed=seed)
        ours({"image": crop})

    def run_reference(seed: int) -> None:
        reference.set_random_seed(seed)
        reference(image=crop)

    times: dict[str, list[float]] = {"ours": [], "albumentations": []}
    for i in range(repeats):
        times["ours"].append(timed(lambda i=i: run_ours(i)))
        times["albumentations"].append(timed(lambda i=i: run_reference(i)))
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def print_augment(image_size: int, repeats: int) -> None:
    us = augment_us(image_size, repeats)
    print(
        f"{f'augmentation per {image_size} px crop':<34} {us['ours']:8.1f} us  (albumentations "
        f"{us['albumentations']:.1f} us, ratio {us['ours'] / us['albumentations']:.2f})"
    )


def cpu_ms_per_item(rows: pd.DataFrame, root: Path, image_size: int, epochs: int = 1) -> float:
    """CPU milliseconds (process time) per item of the cached training pipeline, 0 workers.

    Process time barely moves with other jobs on the machine, unlike wall time, so this is the cost of
    one item on one dedicated core: a worker's items/s is about 1000 / this.
    """
    mean, std = compute_mean_std(rows, root, image_size=image_size)
    ds = build_dataset(rows, root, image_size=image_size, train=True, mean=mean, std=std, cache="memory", workers=2)
    sampler = LesionFrameSampler(rows, frames_per_lesion=FRAMES_PER_LESION, seed=0)
    loader = make_loader(ds, BATCH, sampler=sampler, workers=0, seed=0)
    start = time.process_time()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        sum(len(b["frame_id"]) for b in loader)
    return 1e3 * (time.process_time() - start) / (epochs * len(sampler))


def default_report(rows: pd.DataFrame, root: Path, rounds: int) -> None:
    """Cold and cached pipelines, 0 and 2 workers, eval pipeline and cache fills, against the default model."""
    step = gr_step(DEFAULT_SIZE, "micro", 8, BATCH)
    for _ in range(3):
        step()
    print(f"{'case':<34} {'items/s':>8}  {'train samples/s':>15}  {'ratio':>6}  build s")
    cases = [(cache, workers, True) for cache in ("none", "memory") for workers in (0, 2)]
    for cache, workers, train in cases + [("memory", 0, False)]:
        r = pipeline_vs_training(rows, root, step, BATCH, cache, workers, rounds, DEFAULT_SIZE, train)
        label = (
            f"{'train' if train else 'eval'} pipeline {'cached' if cache == 'memory' else 'cold'}, {workers} workers"
        )
        print(f"{label:<34} {r['items_s']:8.1f}  {r['train_s']:15.1f}  {r['ratio']:5.1f}x  {r['build_s']:.2f}")
    print_augment(DEFAULT_SIZE, 2000)
    for source in ("frames", "video"):
        for workers in (1, 2):
            rates = [fill_rate(rows, root, source, workers, DEFAULT_SIZE) for _ in range(rounds)]
            label = f"cache fill from {source}, {workers} thread{'s' * (workers > 1)}"
            print(f"{label:<34} {statistics.median(rates):8.1f} items/s")


def paper_report(rows: pd.DataFrame, root: Path, rounds: int, image_size: int) -> None:
    """The paper profile's data path: the cached pipeline, 0/2/4 workers, against ViT-Ti/16 GR steps."""
    step = gr_step(image_size, "ti", 16, PAPER_GR_BATCH)
    step()
    print(
        f"# ViT-Ti/16 GR steps at {image_size} px, batch {PAPER_GR_BATCH}, median of {PAPER_STEPS_PER_ROUND} per round"
    )
    print(f"{'case':<34} {'items/s':>8}  {'train samples/s':>15}  {'ratio':>6}  build s")
    for workers in PAPER_WORKERS:
        r = pipeline_vs_training(
            rows,
            root,
            step,
            PAPER_GR_BATCH,
            "memory",
            workers,
            rounds,
            image_size,
            steps_per_round=PAPER_STEPS_PER_ROUND,
        )
        label = f"train pipeline cached, {workers} workers"
        print(f"{label:<34} {r['items_s']:8.1f}  {r['train_s']:15.1f}  {r['ratio']:5.1f}x  {r['build_s']:.2f}")
    print_augment(image_size, 200)
    print(f"{'cached pipeline, CPU time per item':<34} {cpu_ms_per_item(rows, root, image_size):8.2f} ms (1 thread)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frame-size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_SIZE,
        help=f"crop size; other than {DEFAULT_SIZE}: the paper profile's data path (ViT-Ti/16)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        gen_fps = generate(root, args.videos, tuple(args.frame_size))
        rows = build_manifest("synthetic", root, folds=2, seed=0)
        print(
            f"# {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"# synthetic {args.videos} videos {args.frame_size[0]}x{args.frame_size[1]}: {len(rows)} rows, "
            f"{rows['lesion_id'].nunique()} lesions, {rows['lesion_id'].nunique() * FRAMES_PER_LESION} "
            f"items/epoch; medians of {args.rounds} rounds (1 epoch + GR steps each)"
        )
        print(f"{'synthetic generator':<34} {gen_fps:8.1f} frames/s (2 processes)")
        if args.image_size == DEFAULT_SIZE:
            default_report(rows, root, args.rounds)
        else:
            paper_report(rows, root, args.rounds, args.image_size)


if __name__ == "__main__":
    main()
