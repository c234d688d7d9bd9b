"""``fsg-endo compare``: an experiment's runs by regulariser and train fraction, as a terminal table."""

from __future__ import annotations

import pandas as pd

from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.analysis import (
    at_best_epoch,
    group_keys,
    is_validation,
    latest_per_cell,
    open_client,
    regularizer_order,
    search_runs,
    summarize,
)
from fsg_endo.tracking.tracker import resolve_tracking_uri

NOT_FINISHED = ("FAILED", "KILLED")


def default_metric(runs: pd.DataFrame, exp: str) -> str:
    """The sweep's headline metric of the runs' task (lesion-level MAE or balanced accuracy), on the test split,
    or on the validation split when every run validated a swept fold (``sweep.fold_role`` validation)."""
    from fsg_endo.engine.tasks import get_task

    tasks = sorted(runs["task"].dropna().unique())
    if len(tasks) != 1:
        raise FsgEndoError(f"experiment {exp!r}: runs of tasks {tasks or 'unknown'}; name one with --metric")
    split = "val" if "fold_role" in runs and runs["fold_role"].eq("validation").all() else "test"
    return f"lesion/{split}/{get_task(tasks[0]).main_metric}"


def compare_table(exp: str, tracking_uri: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """Per (regulariser, train fraction): finished runs, failed runs, mean and std of ``metric``.

    ``metric`` may list several, comma-separated; default: the task's main test metric (validation metrics are read
    at each run's best epoch). Sweep parents
    are left out, and a (regulariser, fraction, fold, seed) cell run more than once counts once, by
    its latest finished run. The tracking URI resolves as for ``fsg-endo run``.
    """
    client = open_client(resolve_tracking_uri(tracking_uri))
    runs = search_runs(client, exp)
    runs = runs[runs["regularizer"].notna() & (runs["regularizer"] != "sweep")] if len(runs) else runs
    if runs.empty:
        raise FsgEndoError(f"{client.tracking_uri}: experiment {exp!r} has no runs")
    metrics = [m.strip() for m in metric.split(",")] if metric else [default_metric(runs, exp)]
    done = latest_per_cell(runs)
    for m in (m for m in metrics if m in done and is_validation(m)):
        done[m] = at_best_epoch(client, done, m)
    missing = [m for m in metrics if m not in done]
    if missing:
        known = sorted(c for c in done if c.startswith(("test/", "lesion/test/")))
        raise FsgEndoError(
            f"experiment {exp!r}: no finished run logged {', '.join(missing)} "
            f"(test metrics: {', '.join(known) or 'none'})"
        )
    keys = group_keys(runs)
    stats = summarize(done, metrics)
    finished = done.groupby(keys).size()
    failed = runs[runs["status"].isin(NOT_FINISHED)].groupby(keys).size()
    order = regularizer_order(set(finished.index.get_level_values(0)) | set(failed.index.get_level_values(0)))
    index = pd.MultiIndex.from_tuples(
        sorted(set(finished.index) | set(failed.index), key=lambda key: (order.index(key[0]), *key[1:])), names=keys
    )
    table = pd.DataFrame(
        {"runs": finished.reindex(index, fill_value=0), "failed": failed.reindex(index, fill_value=0)}, index=index
    )
    for m in metrics:
        table[f"{m} mean"] = stats[f"{m} mean"].reindex(index)
        table[f"{m} std"] = stats[f"{m} std"].reindex(index)
    return table
