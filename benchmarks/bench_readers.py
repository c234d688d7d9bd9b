"""Benchmark of the REAL-Colon reader and manifest builder on a few thousand VOC files.

Writes a REAL-Colon tree (frame files are empty placeholders: the reader lists frames but does not
decode them) and times ``read_realcolon`` and ``build_manifest``. Run:
``python benchmarks/bench_readers.py [--videos 10] [--frames 500] [--positive 0.3]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn.model_selection  # noqa: F401  (imported lazily by assign_folds: keep it out of the timing)

from fsg_endo.data.manifest import build_manifest
from fsg_endo.data.readers import read_realcolon

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_data import random_box, voc_xml


def write_tree(root: Path, videos: int, frames: int, positive: float, seed: int = 0) -> int:
    """A REAL-Colon tree of ``videos`` x ``frames`` frames, a share ``positive`` of them with 1-2 lesions."""
    rng = np.random.default_rng(seed)
    lesions, names = [], []
    for v in range(1, videos + 1):
        video = f"001-{v:03d}"
        names.append(video)
        ids = [f"{video}_{k}" for k in (1, 2)]
        lesions += [(lid, video, float(rng.uniform(1, 20))) for lid in ids]
        (root / f"{video}_frames").mkdir(parents=True)
        (root / f"{video}_annotations").mkdir()
        for t in range(frames):
            (root / f"{video}_frames" / f"{video}_{t}.jpg").touch()
            shown = ids[: int(rng.integers(1, 3))] if rng.random() < positive else []
            objects = [(lid, random_box(rng, 1240, 1080)) for lid in shown]
            (root / f"{video}_annotations" / f"{video}_{t}.xml").write_text(
                voc_xml(f"{video}_{t}.jpg", 1240, 1080, objects)
            )
    pd.DataFrame(lesions, columns=["unique_object_id", "unique_video_name", "size [mm]"]).to_csv(
        root / "lesion_info.csv", index=False
    )
    pd.DataFrame({"unique_video_name": names}).to_csv(root / "video_info.csv", index=False)
    return videos * frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--positive", type=float, default=0.3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = write_tree(root, args.videos, args.frames, args.positive)
        for name, fn in (
            ("read_realcolon", lambda: read_realcolon(root)),
            ("build_manifest", lambda: build_manifest("realcolon", root, folds=5)),
        ):
            start = time.perf_counter()
            rows = len(fn())
            elapsed = time.perf_counter() - start
            print(f"{name}: {n} XML files, {rows} rows in {elapsed:.2f} s ({n / elapsed:,.0f} XML/s)")


if __name__ == "__main__":
    main()
