"""``fsg-endo report``: every arm of a sweep against the reference arms, paired on identical cells.

One row per (train fraction, grid point, arm, reference): the arm's metric over the (fold, seed) cells both
arms ran, and the paired differences ``diff = arm - reference``. Folds share most of their training lesions,
so the differences of one sweep are correlated and a plain paired t-test is too liberal; the Nadeau-Bengio
corrected resampled t-test inflates the variance of the mean by ``1/n + n_test/n_train`` instead of ``1/n``
(Nadeau & Bengio 2003, Bouckaert & Frank 2004). The diff CI is that test's 95% interval. ``p_holm`` is
``p_corrected_t`` Holm-adjusted over every row of the report.

With an axis (``--axis KEY``, a ``sweep.grid`` key), the report compares instead each value of that axis with a
reference value of it for the same arm (e.g. ``model.weights``: a pretrained backbone against scratch), paired
on the cells that agree in every other grid key; the arm column then reads ``fsg_gr @ KEY=VALUE``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.analysis import (
    at_best_epoch,
    is_validation,
    latest_per_cell,
    open_client,
    regularizer_order,
    sweep_runs,
)
from fsg_endo.experiment.compare import default_metric
from fsg_endo.tracking.tracker import Tracker, resolve_tracking_uri

COLUMNS = [
    "train_fraction",
    "arm",
    "reference",
    "n",
    "mean",
    "std",
    "diff_mean",
    "diff_ci_low",
    "diff_ci_high",
    "p_corrected_t",
    "p_wilcoxon",
    "p_holm",
    "effect_size",
]
REFERENCES = ("fsg_gr", "none")
LEVEL = 0.95


def sizes(metric: str) -> tuple[str, str]:
    """What ``n_test / n_train`` of the correction is read from: the metric's held-out split and the training set."""
    held_out = "val" if is_validation(metric) else "test"
    return f"data/{held_out}_lesions", "data/train_lesions"


def corrected_t(diff: np.ndarray, test_train_ratio: float, level: float = LEVEL) -> tuple[float, float, float]:
    """Nadeau-Bengio corrected resampled t-test of mean(diff) = 0: two-sided p and the ``level`` CI of the mean."""
    n = diff.size
    if n < 2 or not np.isfinite(test_train_ratio):
        return math.nan, math.nan, math.nan
    mean, scale = diff.mean(), math.sqrt((1.0 / n + test_train_ratio) * diff.var(ddof=1))
    if scale == 0:
        return math.nan, mean, mean
    t = stats.t(df=n - 1, loc=mean, scale=scale)
    low, high = t.interval(level)
    return float(2 * stats.t.sf(abs(mean) / scale, n - 1)), float(low), float(high)


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values over every finite entry of ``p`` (NaN stays NaN)."""
    p = np.asarray(p, dtype=float)
    out, finite = np.full_like(p, np.nan), np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def paired_row(arm_values: np.ndarray, reference_values: np.ndarray, test_train_ratio: float) -> dict[str, float]:
    """The statistics of one (arm, reference) comparison on its paired cells."""
    diff, n = arm_values - reference_values, arm_values.size
    p_t, low, high = corrected_t(diff, test_train_ratio)
    sd = diff.std(ddof=1) if n >= 2 else math.nan
    return {
        "n": n,
        "mean": arm_values.mean(),
        "std": arm_values.std(ddof=1) if n >= 2 else math.nan,
        "diff_mean": diff.mean(),
        "diff_ci_low": low,
        "diff_ci_high": high,
        "p_corrected_t": p_t,
        "p_wilcoxon": float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else math.nan,
        "effect_size": diff.mean() / sd if sd > 0 else math.nan,
    }


def sweep_report(runs: pd.DataFrame, metric: str, references: Sequence[str] = REFERENCES) -> pd.DataFrame:
    """The report of finished sweep children (one row per run: regularizer, train_fraction, grid_point, fold,
    seed, ``metric`` and the lesion counts of :func:`sizes`). A ``grid_point`` column follows
    ``train_fraction`` when the sweep has a grid or variants."""
    if metric not in runs:
        raise FsgEndoError(f"no finished run logged {metric}")
    runs = runs.assign(grid_point=runs.get("grid_point", pd.Series("", index=runs.index)).fillna(""))
    held_out, train = sizes(metric)
    ratio = runs[held_out] / runs[train] if {held_out, train} <= set(runs) else pd.Series(np.nan, index=runs.index)
    cells = ["train_fraction", "grid_point", "fold", "seed"]
    table = runs.assign(ratio=ratio).pivot_table(
        index=cells, columns="regularizer", values=[metric, "ratio"], aggfunc="mean", dropna=False
    )
    rows = []
    for (fraction, point), block in table.groupby(level=["train_fraction", "grid_point"], sort=True):
        values, ratios = block[metric], block["ratio"]
        for reference in [r for r in references if r in values and values[r].notna().any()]:
            for arm in regularizer_order(c for c in values if c != reference):
                paired = values[[arm, reference]].dropna()
                if paired.empty:
                    continue
                ratio = np.nanmean(ratios.loc[paired.index, [arm, reference]].to_numpy(float))
                rows.append(
                    {"train_fraction": fraction, "grid_point": point, "arm": arm, "reference": reference}
                    | paired_row(paired[arm].to_numpy(float), paired[reference].to_numpy(float), ratio)
                )
    if not rows:
        raise FsgEndoError(f"no cells where an arm and a reference arm ({', '.join(references)}) both finished")
    report = pd.DataFrame(rows)
    report["p_holm"] = holm(report["p_corrected_t"])
    grid = ["grid_point"] if report["grid_point"].ne("").any() else []
    return report[COLUMNS[:1] + grid + COLUMNS[1:]]


def split_grid_point(point: str) -> dict[str, str]:
    """``"gr.gate_lr=0.01,optim.lr=0.0005"`` -> ``{"gr.gate_lr": "0.01", "optim.lr": "0.0005"}``."""
    return dict(item.split("=", 1) for item in point.split(",") if item)


def axis_report(runs: pd.DataFrame, metric: str, axis: str, reference_value: str | None = None) -> pd.DataFrame:
    """Each value of the grid axis ``axis`` against ``reference_value`` (default: its first value in sort order)
    for the same arm, paired on (train fraction, the other grid keys, fold, seed); the columns of
    :func:`sweep_report`, with ``arm`` and ``reference`` reading ``ARM @ AXIS=VALUE``."""
    points = runs.get("grid_point", pd.Series("", index=runs.index)).fillna("").map(split_grid_point)
    if not points.map(lambda p: axis in p).all():
        raise FsgEndoError(f"--axis {axis}: not a grid key of every run of this sweep")
    values = points.map(lambda p: p[axis])
    reference_value = sorted(values.unique())[0] if reference_value is None else reference_value
    if reference_value not in set(values):
        raise FsgEndoError(
            f"--axis {axis}: no run has {axis}={reference_value} (values: {', '.join(sorted(values.unique()))})"
        )
    rest = points.map(lambda p: ",".join(f"{k}={v}" for k, v in p.items() if k != axis))
    label = runs["regularizer"] + f" @ {axis}=" + values
    relabelled = runs.assign(regularizer=label, grid_point=rest)
    reports = []
    for arm in regularizer_order(runs["regularizer"].unique()):
        own = relabelled[runs["regularizer"] == arm]
        own_values = set(values[own.index])
        if reference_value in own_values and len(own_values) > 1:  # an arm run at one value only has no pair
            reports.append(sweep_report(own, metric, [f"{arm} @ {axis}={reference_value}"]))
    if not reports:
        raise FsgEndoError(f"--axis {axis}: no arm ran a value other than {reference_value}")
    report = pd.concat(reports, ignore_index=True)
    report["p_holm"] = holm(report["p_corrected_t"])
    return report


def report_markdown(report: pd.DataFrame, metric: str) -> str:
    """The report as a Markdown table, with what the columns mean."""
    return (
        f"Paired report on `{metric}`: diff = arm - reference per (fold, seed) cell; CI and p_corrected_t "
        f"from the Nadeau-Bengio corrected resampled t-test; p_holm = Holm over all {len(report)} rows.\n\n"
        + report.to_markdown(index=False, floatfmt=".4g")
        + "\n"
    )


def log_report(parent: Tracker, summary: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """``sweep/report.{csv,md,png}`` on a sweep parent from its summary (None when nothing can be paired)."""
    from fsg_endo.tracking import plots

    done = summary[summary["status"] == "FINISHED"]
    try:
        report = sweep_report(done, metric)
    except FsgEndoError:
        return None
    parent.log_text(report.to_csv(index=False), "sweep/report.csv")
    parent.log_text(report_markdown(report, metric), "sweep/report.md")
    parent.log_figure(plots.report_figure(report, metric), "sweep/report.png")
    return report


def report_table(
    exp: str,
    tracking_uri: str | None = None,
    metric: str | None = None,
    reference: str | None = None,
    parent_run_id: str | Sequence[str] | None = None,
    axis: str | None = None,
) -> pd.DataFrame:
    """``fsg-endo report``: the report of the latest sweep of ``exp`` (or of ``parent_run_id``; several parents:
    their children together, e.g. two sweeps that ran different arms on the same cells) from MLflow; with
    ``axis``, the values of that grid key against ``reference`` (a value of it) per arm. A validation metric is
    read at each run's best epoch (the checkpoint it tested), not its last."""
    client = open_client(resolve_tracking_uri(tracking_uri))
    parents = [parent_run_id] if parent_run_id is None or isinstance(parent_run_id, str) else parent_run_id
    children = pd.concat([sweep_runs(client, exp, parent)[1] for parent in parents], ignore_index=True)
    runs = latest_per_cell(children).copy()  # one block per dtype: the metric columns of many runs fragment it
    metric = metric or default_metric(runs, exp)
    if metric in runs and is_validation(metric):
        runs[metric] = at_best_epoch(client, runs, metric)
    if axis is not None:
        return axis_report(runs, metric, axis, reference)
    if reference is not None and reference not in set(runs["regularizer"]):
        raise FsgEndoError(
            f"experiment {exp!r}: --reference {reference!r} has no finished runs "
            f"(arms: {', '.join(regularizer_order(runs['regularizer'].unique()))})"
        )
    return sweep_report(runs, metric, [reference] if reference else REFERENCES)
