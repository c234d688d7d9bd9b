"""Generation time and dataset-card numbers of the synthetic colonoscopy dataset (docs/dataset_card.md).

Generates the dataset (default: the standard one, seed 0) with 2 worker processes, then reports
its size distribution, frames per lesion, negative share, the spread of the per-video texture scales,
and the single-cue baselines per lesion (``fsg_endo.engine.baselines``: ridge on log size for the MAE,
logistic regression for triclass balanced accuracy) trained on the training folds of each split and
scored on its test fold: fold 0 (the default split) and the mean and std over the 5 test folds:

    python benchmarks/bench_synthetic.py [--videos N] [--seed S] [--workers 2] [--out DIR | --root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fsg_endo.data.crop_features import crop_features
from fsg_endo.data.manifest import build_manifest
from fsg_endo.data.splits import make_splits
from fsg_endo.engine.baselines import BASELINES, CROP, evaluate_baseline
from fsg_endo.engine.tasks import get_task
from fsg_endo.synth.dataset import generate_dataset

CUE_SETS = {
    "box geometry": ("box",),
    "brightness": ("brightness",),
    "colour": ("colour",),
    "texture band energies": ("texture",),
    "all together (appearance)": BASELINES["appearance"],
}
LESION_METRICS = ("lesion/test/mae", "lesion/test/cls3_balanced_accuracy")


def single_cue_baselines(manifest: pd.DataFrame, root: Path, folds: int = 5, workers: int = 2) -> dict:
    """Per cue set: the lesion-level test metrics on fold 0 and their mean / std over all test folds."""
    rows = pd.concat([manifest, crop_features(manifest, root, workers=workers, **CROP)], axis=1)
    task, out = get_task("size_regression"), {}
    for name, cues in CUE_SETS.items():
        per_fold = []
        for k in range(folds):
            splits = make_splits(rows, test_fold=k, val_fold=(k + 1) % folds)
            per_fold.append(evaluate_baseline(task, splits, splits, cues)[0])
        table = pd.DataFrame(per_fold)[list(LESION_METRICS)]
        out[name] = {
            m: {
                "fold0": round(float(table[m].iloc[0]), 3),
                "mean": round(float(table[m].mean()), 3),
                "std": round(float(table[m].std()), 3),
            }
            for m in LESION_METRICS
        }
    return out


def card_numbers(root: Path, workers: int = 2) -> dict:
    """Everything the dataset card reports, from the files of a generated dataset."""
    meta = json.loads((root / "synthetic.json").read_text())
    manifest = build_manifest("synthetic", root, folds=5, seed=0)
    positive = manifest.groupby("video_id")["frame_id"].nunique().sum()
    lesions = pd.read_csv(root / "lesion_info.csv")
    videos = pd.read_csv(root / "video_info.csv")
    side = np.sqrt((manifest["xmax"] - manifest["xmin"]) * (manifest["ymax"] - manifest["ymin"]))
    return {
        **meta["summary"],
        "negative_share": round(1 - positive / meta["summary"]["frames"], 4),
        "size_mm": lesions["size [mm]"].describe()[["min", "50%", "max"]].round(1).to_dict(),
        "box_side_px_quartiles": np.percentile(side, [25, 50, 75]).round(1).tolist(),
        "texture_scale": videos["texture_scale"].describe()[["min", "50%", "max"]].round(2).to_dict(),
        "pit_mm": lesions["pit_mm"].describe()[["min", "50%", "max"]].round(2).to_dict(),
        "baselines_per_lesion": single_cue_baselines(manifest, root, workers=workers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="keep the dataset here (default: a temporary folder)")
    parser.add_argument("--root", default=None, help="report on this generated dataset (no generation, no timing)")
    args = parser.parse_args()
    if args.root:
        print(json.dumps(card_numbers(Path(args.root), args.workers), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or Path(tmp) / "synthetic")
        start, cpu = time.perf_counter(), os.times()
        generate_dataset(root, n_videos=args.videos, seed=args.seed, workers=args.workers, progress=False)
        seconds, used = time.perf_counter() - start, os.times()
        child_cpu = used.children_user + used.children_system - cpu.children_user - cpu.children_system
        numbers = card_numbers(root, args.workers)
        numbers["generation"] = {
            "seconds": round(seconds, 1),
            "workers": args.workers,
            "frames_per_second": round(numbers["frames"] / seconds, 1),
            "cpu_seconds": round(used.user + used.system - cpu.user - cpu.system + child_cpu, 1),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
        }
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
