"""Choose the CPU default recipe of ``polyp_size_fsg`` on validation folds only (issue 11).

Every candidate (a list of ``--set`` overrides) is trained once per validation fold with test fold 0
held out of training *and* of the choice: the CSV gets lesion-level validation metrics of the best
epoch only, beside the appearance baseline's on the same validation rows. Test metrics are read once,
afterwards, by ``benchmarks/test_folds.py`` for the chosen recipe (over all 5 test folds).

    python benchmarks/tune_recipe.py --out tune.csv [--val-folds 1 2 3 4] [--candidates current relw ...] [--seeds 0 1]
    python benchmarks/tune_recipe.py --summary tune*.csv [--reference current]

Each run is a subprocess of ``experiments/run.py`` (its own MLflow store under the output folder); set
``FSG_ENDO_CACHE`` to share the generated dataset between runs. ``--seeds 0 1 2`` trains each candidate and
fold once per training seed on the same data and folds: seed ``s`` > 0 runs with ``seed=s`` but the synthetic
dataset and manifest of seed 0 (``data.synthetic_seed``, ``data.manifest``), so only initialisation,
sampling and augmentation draws change. One seed per candidate cannot resolve gaps below about 0.07 mm.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd

from fsg_endo.data.sizes import size_class3
from fsg_endo.engine.tasks import get_task
from fsg_endo.experiment.analysis import load_predictions

REPO = Path(__file__).resolve().parents[1]
QUIET = ["tracking.log_model=false", "tracking.plots=false"]
# The recipe the search started from (the CPU default until issue 11's choice): every candidate below is
# overrides on top of it, so each row of the search reruns as it was measured (docs/results.md).
PREVIOUS_DEFAULT = ["model.size_head=linear", "model.patch_size=8", "optim.epochs=15"]
CHOSEN = ["model.size_head=log_box", "model.patch_size=16", "optim.epochs=26"]  # issue 11's first choice
SEARCH: dict[str, list[str]] = {
    "default": [],  # the earlier recipe itself (docs/results.md, "The recipe and what its search established")
    "context1": ["data.context=1.0"],
    "unweighted": ["loss.main_weights=[1,1,1]", "loss.gate_weights=[1,1,1]"],
    "lr1e-3": ["optim.lr=1e-3"],
    "long": ["optim.epochs=25", "data.frames_per_lesion=12"],
    "noaug": ["data.augment=false"],
    "geometric": ["data.photometric=false"],
    "noaug_lr1e-3": ["data.augment=false", "optim.lr=1e-3"],
    "geometric_lr1e-3": ["data.photometric=false", "optim.lr=1e-3"],
    "noaug_balanced": ["data.augment=false", "data.class_balanced=true"],
    "geometric_l1": ["data.photometric=false", "loss.beta=0.1"],
    "res96": ["data.image_size=96", "model.patch_size=12"],  # the same 64 tokens, each seeing 2.25x the pixels
    "res128": ["data.image_size=128", "model.patch_size=16"],
    "logbox": ["model.size_head=log_box"],  # the head predicts log(size / box side): the ridge's structure
    "logbox_geometric": ["model.size_head=log_box", "data.photometric=false"],
    "logbox_lr1e-3": ["model.size_head=log_box", "optim.lr=1e-3"],
    "logbox_p16_e40": ["model.size_head=log_box", "model.patch_size=16", "optim.epochs=40"],  # 16 tokens: ~3x the steps
    "logbox_p16_e26": CHOSEN,  # the 300 s budget
    "logbox_p16_e36": ["model.size_head=log_box", "model.patch_size=16", "optim.epochs=36"],
    # Class weights near 1 / size: the loss weighs relative (log-space) errors about evenly across sizes,
    # as the baseline's ridge on log size does, instead of aiming at the large polyps' millimetres.
    "relw": [*CHOSEN, "loss.main_weights=[1,0.4,0.2]", "loss.gate_weights=[1,0.4,0.2]"],
    "logbox_unweighted": [*CHOSEN, "loss.main_weights=[1,1,1]", "loss.gate_weights=[1,1,1]"],  # between the two
    # The paper's colour jitter blurs brightness, a distance cue the appearance baseline reads; flips and rotation stay
    "chosen_geometric": [*CHOSEN, "data.photometric=false"],
    "relw_l1": [*CHOSEN, "loss.main_weights=[1,0.4,0.2]", "loss.gate_weights=[1,0.4,0.2]", "loss.beta=0.05"],
}
# "current" is the config as it is now; every other candidate is overrides on top of PREVIOUS_DEFAULT
CANDIDATES = {"current": [], **{name: [*PREVIOUS_DEFAULT, *sets] for name, sets in SEARCH.items()}}
LESION_VAL = ("mae", "cls3_balanced_accuracy")  # read at the best epoch; bias_le5mm is added from its predictions
TASK = get_task("size_regression")  # its lesion predictions (mean over frames) feed the bias column


def only_run(uri: str) -> tuple[mlflow.MlflowClient, mlflow.entities.Run]:
    """The client of a recipe's own store and its only ``polyp_size_fsg`` run."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    return client, client.search_runs([client.get_experiment_by_name("polyp_size_fsg").experiment_id])[0]


def best_epoch_metrics(uri: str) -> dict[str, float]:
    """Lesion-level validation metrics at the run's best epoch (the only run of the store)."""
    client, run = only_run(uri)
    best = int(run.data.metrics["best_epoch"])
    step = {int(m.value): m.step for m in client.get_metric_history(run.info.run_id, "epoch")}[best]
    out = {"best_epoch": best}
    for name in LESION_VAL:
        values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"lesion/val/{name}")}
        out[f"lesion/val/{name}"] = values[step]
    return out | small_bias(load_predictions(client, run.info.run_id, "val"))


def small_bias(frames: pd.DataFrame) -> dict[str, float]:
    """Mean signed lesion error (mm) of the validation lesions of at most 5 mm: the shrinkage toward the mean
    size that the loss weights act on."""
    lesions = TASK.lesion_predictions(frames)
    small = lesions[size_class3(lesions["size_mm"].to_numpy(float)) == 0]
    return {"lesion/val/bias_le5mm": float((small["prediction"] - small["size_mm"]).mean())}


def training_seed(seed: int) -> list[str]:
    """Overrides that change the training seed only: seed 0's synthetic dataset and manifest (its folds) stay."""
    if seed == 0:
        return []
    from fsg_endo.engine.prepare import dataset_root, manifest_path
    from fsg_endo.experiment.config import load_config

    data = load_config("polyp_size_fsg").data
    manifest = manifest_path(data, dataset_root(data, 0), 0)
    return [f"seed={seed}", "data.synthetic_seed=0", f"data.manifest={manifest.resolve()}"]


def train_recipe(
    name: str, overrides: list[str], val_fold: int, work: Path, test_fold: int = 0, seed: int = 0
) -> tuple[dict, str]:
    """Run the main job with one recipe, split and training seed in its own MLflow store: (timing row, store URI)."""
    folder = work / (f"{name}_t{test_fold}_v{val_fold}" + (f"_s{seed}" if seed else ""))
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    sets = [*QUIET, *overrides, *training_seed(seed), f"data.test_fold={test_fold}", f"data.val_fold={val_fold}"]
    args = [sys.executable, str(REPO / "experiments" / "run.py"), "--exp", "polyp_size_fsg"]
    for item in sets:
        args += ["--set", item]
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:  # holds the test column too: not read while choosing
        proc = subprocess.run(
            args, cwd=folder, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log, stderr=subprocess.STDOUT
        )
    row = {
        "candidate": name,
        "val_fold": val_fold,
        "seed": seed,
        "overrides": " ".join(overrides),
        "seconds": round(time.perf_counter() - start, 1),
        "load_1min": round(os.getloadavg()[0], 2),
    }
    return (row if proc.returncode == 0 else row | {"failed": proc.returncode}), uri


def run_candidate(name: str, overrides: list[str], val_fold: int, work: Path, seed: int = 0) -> dict:
    """Train one candidate with validation fold ``val_fold`` (test fold 0 left out); its validation metrics."""
    row, uri = train_recipe(name, overrides, val_fold, work, seed=seed)
    return row if "failed" in row else row | best_epoch_metrics(uri)


def baseline_rows(val_folds: list[int]) -> list[dict]:
    """The appearance baseline on the same validation rows (trained on the same training folds)."""
    from fsg_endo.engine.baselines import baseline_metrics
    from fsg_endo.experiment.config import load_config

    rows = []
    for v in val_folds:
        cfg = load_config("polyp_size_fsg", ["data.test_fold=0", f"data.val_fold={v}"])
        metrics, tables = baseline_metrics(cfg, "appearance")
        rows.append(
            {"candidate": "baseline_appearance", "val_fold": v}
            | {f"lesion/val/{m}": metrics[f"lesion/val/{m}"] for m in LESION_VAL}
            | small_bias(tables["val"])
        )
    return rows


def paired_summary(table: pd.DataFrame, reference: str = "current") -> pd.DataFrame:
    """Every candidate against ``reference`` on the (fold, seed) cells both ran, with the project's paired
    statistics (:func:`fsg_endo.experiment.report.paired_row`; Nadeau-Bengio ratio 1/3: one validation fold
    against three training folds). The baseline does not depend on the seed, so it pairs with every seed."""
    from fsg_endo.experiment.report import paired_row

    table = table.assign(seed=table.get("seed", pd.Series(0, index=table.index)))
    base = table["candidate"].str.startswith("baseline_")
    trained = table[~base].fillna({"seed": 0})
    seeds = pd.DataFrame({"seed": trained["seed"].unique()})
    fixed = table[base].drop(columns="seed").drop_duplicates(["candidate", "val_fold"]).merge(seeds, how="cross")
    cells = pd.concat([trained, fixed]).drop_duplicates(["candidate", "val_fold", "seed"], keep="last")
    rows = []
    for metric in (f"lesion/val/{m}" for m in LESION_VAL):
        wide = cells.pivot(index=["val_fold", "seed"], columns="candidate", values=metric)
        for name in (c for c in wide.columns if c != reference):
            both = wide[[name, reference]].dropna()
            rows.append(
                {"candidate": name, "reference": reference, "metric": metric}
                | paired_row(both[name].to_numpy(), both[reference].to_numpy(), 1 / 3)
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="CSV of results (rewritten after every run)")
    parser.add_argument("--val-folds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (data and folds fixed)")
    parser.add_argument("--reference", default="current", help="candidate the paired summary compares against")
    parser.add_argument("--summary", nargs="+", metavar="CSV", help="only print the paired summary of these results")
    args = parser.parse_args()
    if args.summary:
        print(paired_summary(pd.concat(map(pd.read_csv, args.summary)), args.reference).round(3).to_string())
        return
    if not args.out:
        parser.error("--out is required (unless --summary)")
    out = Path(args.out)
    rows = baseline_rows(args.val_folds)
    pd.DataFrame(rows).to_csv(out, index=False)
    for seed in args.seeds:  # seed- then fold-major: every candidate gets each fold before the next fold
        for v in args.val_folds:
            for name in args.candidates:
                rows.append(run_candidate(name, CANDIDATES[name], v, out.parent / "tune_runs", seed))
                pd.DataFrame(rows).to_csv(out, index=False)
    table = pd.DataFrame(rows)
    columns = [f"lesion/val/{m}" for m in (*LESION_VAL, "bias_le5mm")]
    print(table.groupby("candidate")[columns].agg(["mean", "std", "count"]))
    if args.reference in set(table["candidate"]):
        print(paired_summary(table, args.reference).round(3).to_string())


if __name__ == "__main__":
    main()
