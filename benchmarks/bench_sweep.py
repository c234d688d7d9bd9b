"""Wall time of one short sweep, sequential against Ray (children side by side), interleaved repeats.

The grid is the default experiment's (micro ViT, 64 px) with ``--arms`` x one train fraction, ``--epochs``
epochs of ``--frames`` frames per lesion (also the cap at evaluation), models not logged, the synthetic dataset
cached beforehand (``--cache``). Each sweep is a fresh ``experiments/run.py`` process into its own SQLite
store, so Ray's start-up is part of its time:

    python benchmarks/bench_sweep.py [--rounds 3] [--epochs 2] [--frames 5] [--fraction 1.0] [--concurrent 2]
                                     [--cache DIR] [--gpus 0.25,0.5,1]

``--gpus`` (on a machine with a GPU): children per hour of the same grid for each ``sweep.resources.gpus``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sweep_args(arms: str, epochs: int, frames: int, fraction: float = 1.0) -> list[str]:
    return [
        "--exp",
        "regularization_sweep",
        "--set",
        f"sweep.regularizers=[{arms}]",
        "--set",
        f"sweep.train_fractions=[{fraction}]",
        "--set",
        "sweep.folds=[0]",
        "--set",
        "sweep.seeds=[0]",
        "--set",
        f"optim.epochs={epochs}",
        "--set",
        "tracking.log_model=false",
        "--set",
        "tracking.plots=false",
        "--set",
        f"data.frames_per_lesion={frames}",
        "--set",
        f"data.eval_frames_per_lesion={frames}",
    ]


def timed_sweep(args: list[str], work: Path, cache: Path) -> float:
    """Seconds one sweep takes, as a fresh process; fails loudly if the sweep does."""
    work.mkdir(parents=True)
    env = {**os.environ, "FSG_ENDO_CACHE": str(cache), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "run.py"), *args], cwd=work, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or "FAILED" in proc.stdout:
        raise SystemExit(f"sweep failed ({proc.returncode}): {proc.stderr[-2000:]}\n{proc.stdout[-1000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--frames", type=int, default=5, help="frames per lesion per epoch and at evaluation")
    parser.add_argument("--fraction", type=float, default=1.0, help="the grid's one train fraction")
    parser.add_argument("--cache", default=None, help="FSG_ENDO_CACHE holding the dataset (default: a new one)")
    parser.add_argument("--arms", default="none, dropout, fsg, fsg_gr")
    parser.add_argument("--concurrent", type=int, default=2, help="Ray children at once (1 CPU each)")
    parser.add_argument("--gpus", default=None, help="comma-separated sweep.resources.gpus values (GPU machine)")
    args = parser.parse_args()
    base = sweep_args(args.arms, args.epochs, args.frames, args.fraction)
    variants = {
        "sequential": [*base, "--set", "sweep.executor=sequential"],
        "ray": [
            *base,
            "--set",
            "sweep.executor=ray",
            "--set",
            f"sweep.max_concurrent={args.concurrent}",
            "--set",
            "sweep.resources.cpus=1",
        ],
    }
    for share in filter(None, (args.gpus or "").split(",")):
        variants[f"ray_gpus_{share}"] = [*base, "--set", "device=cuda", "--set", f"sweep.resources.gpus={share}"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or Path(tmp) / "cache")
        timed_sweep(
            [
                *base,
                "--set",
                "sweep.executor=sequential",
                "--set",
                "optim.epochs=1",
                "--set",
                "sweep.regularizers=[none]",
            ],
            Path(tmp) / "warmup",
            cache,
        )  # data cached, imports warm
        times: dict[str, list[float]] = {name: [] for name in variants}
        loads = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for name in list(variants) if r % 2 == 0 else list(reversed(variants)):  # interleaved, alternating
                times[name].append(round(timed_sweep(variants[name], Path(tmp) / f"{name}_{r}", cache), 1))
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1}: {name} {times[name][-1]} s", file=sys.stderr, flush=True)
    children = len(args.arms.split(","))
    medians = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "grid": f"{children} arms x fraction {args.fraction}, {args.epochs} epochs, {args.frames} frames per lesion",
        "seconds": times,
        "median_seconds": medians,
        "speedup_ray_vs_sequential": {
            "of_medians": round(medians["sequential"] / medians["ray"], 3),
            "per_round": [round(s / r, 3) for s, r in zip(times["sequential"], times["ray"])],
        },
        "children_per_hour": {name: round(3600 * children / m, 1) for name, m in medians.items()},
        "machine": {"cpus": os.cpu_count(), "load_average_1min": [round(x, 1) for x in loads]},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
