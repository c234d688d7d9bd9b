"""Read the test folds once, for the recipe chosen on validation folds (issue 11).

For each test fold k (validation fold k + 1) the main job is trained with the recipe, and its lesion-level
test metrics are written beside the appearance baseline's on the same test rows (fit on the same training
folds); the last lines give mean +- std over the folds.

    python benchmarks/test_folds.py --out test_folds.csv [--recipe current] [--folds 0 1 2 3 4]

Runs are subprocesses of ``experiments/run.py`` as in ``tune_recipe.py``; set ``FSG_ENDO_CACHE`` to share
the generated dataset between them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from tune_recipe import CANDIDATES, LESION_VAL, only_run, train_recipe

FOLDS = 5


def test_metrics(uri: str) -> dict[str, float]:
    """The lesion-level test metrics of the only run of the store."""
    run = only_run(uri)[1]
    return {f"lesion/test/{m}": run.data.metrics[f"lesion/test/{m}"] for m in LESION_VAL}


def appearance_row(test_fold: int, val_fold: int) -> dict:
    """The appearance baseline on the same split, test rows."""
    from fsg_endo.engine.baselines import baseline_metrics
    from fsg_endo.experiment.config import load_config

    cfg = load_config("polyp_size_fsg", [f"data.test_fold={test_fold}", f"data.val_fold={val_fold}"])
    metrics = baseline_metrics(cfg, "appearance")[0]
    return {"candidate": "baseline_appearance", "test_fold": test_fold} | {
        f"lesion/test/{m}": metrics[f"lesion/test/{m}"] for m in LESION_VAL
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="CSV of results (rewritten after every run)")
    parser.add_argument("--recipe", default="current", choices=list(CANDIDATES))
    parser.add_argument("--folds", type=int, nargs="+", default=list(range(FOLDS)))
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for k in args.folds:
        val = (k + 1) % FOLDS
        rows.append(appearance_row(k, val))
        row, uri = train_recipe(args.recipe, CANDIDATES[args.recipe], val, out.parent / "test_runs", test_fold=k)
        rows.append(row | {"test_fold": k} | ({} if "failed" in row else test_metrics(uri)))
        pd.DataFrame(rows).to_csv(out, index=False)
    table = pd.DataFrame(rows)
    print(table.groupby("candidate")[[f"lesion/test/{m}" for m in LESION_VAL]].agg(["mean", "std", "count"]))


if __name__ == "__main__":
    main()
