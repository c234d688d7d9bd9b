"""Where the appearance baseline's edge comes from: ridge on log size against ridge on size in mm (issue 11).

For each validation fold (test fold 0 held out, never read), the ridge of ``fsg_endo.engine.baselines`` is fit
on the training rows' crop features with either target, for three feature sets, and scored per lesion on the
validation rows. Physical size is apparent size times a distance factor, a sum only in log space.

    FSG_ENDO_CACHE=/tmp/cache python benchmarks/baseline_target.py [--val-folds 1 2 3 4]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fsg_endo.engine.baselines import columns_of, split_features
from fsg_endo.engine.prepare import prepare_splits
from fsg_endo.engine.tasks import get_task
from fsg_endo.experiment.config import load_config

FEATURE_SETS = {
    "box": ("box",),
    "box+brightness": ("box", "brightness"),
    "appearance": ("box", "colour", "brightness", "texture"),
}


TASK = get_task("size_regression")


def lesion_mae(rows: pd.DataFrame, size_mm: np.ndarray) -> float:
    """Lesion-level MAE (mm) of per-frame predictions, by the task's own lesion means and metrics."""
    batch = {k: rows[k].to_numpy() for k in ("lesion_id", "video_id", "frame_id", "size_mm")}
    return TASK.compute_metrics(TASK.lesion_predictions(TASK.frame_predictions(batch, size_mm)))["mae"]


def fold_row(val_fold: int) -> dict[str, float]:
    """Lesion-level validation MAE of each feature set with each target, on one validation fold."""
    cfg = load_config("polyp_size_fsg", [f"data.val_fold={val_fold}"])
    rows = prepare_splits(cfg)
    splits = {k: rows.splits[k] for k in ("train", "val")}
    features = split_features(splits, rows.root, cfg.data.source_media, max(cfg.data.workers, 1))
    size = splits["train"]["size_mm"].to_numpy(float)
    out: dict[str, float] = {"val_fold": val_fold}
    for name, cues in FEATURE_SETS.items():
        x_train, x_val = (features[s][columns_of(cues)].to_numpy(float) for s in ("train", "val"))
        for target, forward, back in (("log", np.log, np.exp), ("mm", lambda v: v, lambda v: v)):
            ridge = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x_train, forward(size))
            out[f"{name} / {target}"] = round(lesion_mae(splits["val"], back(ridge.predict(x_val))), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-folds", type=int, nargs="+", default=[1, 2, 3, 4])
    table = pd.DataFrame([fold_row(k) for k in parser.parse_args().val_folds]).set_index("val_fold")
    table.loc["mean"] = table.mean().round(3)
    print(table.T.to_string())


if __name__ == "__main__":
    main()
