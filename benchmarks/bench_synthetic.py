"""Generation time and dataset-card numbers of the synthetic colonoscopy dataset (data_manifests/README.md).

Generates the dataset (default: the standard one, seed 0) with 2 worker processes, then reports
its size distribution, frames per lesion, negative share, the box-size-only baseline (triclass
balanced accuracy, grouped by video) and, as a learnability check, the same classifier given
simple crop features (brightness of polyp and surround, band energies of the texture):

    python benchmarks/bench_synthetic.py [--videos N] [--seed S] [--workers 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from fsg_endo.engine.baselines import box_features, box_only_baseline, cross_validated_proba, grouped_folds
from fsg_endo.data.manifest import build_manifest
from fsg_endo.synth.dataset import generate_dataset

CROP, CONTEXT = 64, 0.5


def crop_features(root: Path, row) -> list[float]:
    """Mean BGR of the polyp centre and of the crop border, and log band energies at 3 scales."""
    image = cv2.imread(str(root / row.frame_path)).astype(np.float32) / 255.0
    side = max(row.xmax - row.xmin, row.ymax - row.ymin) * (1 + 2 * CONTEXT)
    scale = CROP / side
    cx, cy = (row.xmin + row.xmax) / 2, (row.ymin + row.ymax) / 2
    warp = np.float32([[scale, 0, CROP / 2 - cx * scale], [0, scale, CROP / 2 - cy * scale]])
    crop = cv2.warpAffine(image, warp, (CROP, CROP), flags=cv2.INTER_LINEAR)
    border = np.concatenate([crop[:12].reshape(-1, 3), crop[-12:].reshape(-1, 3)])
    features = [*crop[22:42, 22:42].reshape(-1, 3).mean(axis=0), *border.mean(axis=0)]
    previous = crop[..., 2]
    for sigma in (1, 2, 4):
        blurred = cv2.GaussianBlur(crop[..., 2], (0, 0), sigma)
        features.append(float(np.log(np.mean((previous - blurred) ** 2) + 1e-8)))
        previous = blurred
    return features


def card_numbers(root: Path) -> dict:
    """Everything the dataset card reports, from the files of a generated dataset."""
    meta = json.loads((root / "synthetic.json").read_text())
    manifest = build_manifest("synthetic", root, folds=5, seed=0)
    positive = manifest.groupby("video_id")["frame_id"].nunique().sum()
    lesions = pd.read_csv(root / "lesion_info.csv")
    labels = manifest["size_class3"].to_numpy()
    folds = grouped_folds(manifest)
    appearance = np.array([crop_features(root, row) for row in manifest.itertuples()])
    proba = cross_validated_proba(np.column_stack([box_features(manifest).to_numpy(), appearance]), labels, folds)
    side = np.sqrt((manifest["xmax"] - manifest["xmin"]) * (manifest["ymax"] - manifest["ymin"]))
    return {**meta["summary"], "negative_share": round(1 - positive / meta["summary"]["frames"], 4),
            "size_mm": lesions["size [mm]"].describe()[["min", "50%", "max"]].round(1).to_dict(),
            "box_side_px_quartiles": np.percentile(side, [25, 50, 75]).round(1).tolist(),
            "box_only": box_only_baseline(manifest),
            "box_and_crop_features_balanced_accuracy": float(balanced_accuracy_score(labels, proba.argmax(axis=1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="keep the dataset here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or Path(tmp) / "synthetic")
        start, cpu = time.perf_counter(), os.times()
        generate_dataset(root, n_videos=args.videos, seed=args.seed, workers=args.workers, progress=False)
        seconds, used = time.perf_counter() - start, os.times()
        child_cpu = used.children_user + used.children_system - cpu.children_user - cpu.children_system
        numbers = card_numbers(root)
        numbers["generation"] = {"seconds": round(seconds, 1), "workers": args.workers,
                                 "frames_per_second": round(numbers["frames"] / seconds, 1),
                                 "cpu_seconds": round(used.user + used.system - cpu.user - cpu.system + child_cpu, 1),
                                 "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
