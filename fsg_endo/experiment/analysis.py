"""Reading finished runs back from MLflow for the analysis notebooks and ``fsg-endo compare``.

Runs become one pandas row each (tags, the sweep axes from params, the latest value of every
metric); gate snapshots come back from the ``gates/epoch_EEE.npz`` artifacts and predictions from
``predictions/{split}.csv``. Statistics here are small and explicit so the notebooks stay thin.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from fsg_endo.data.sizes import CLASS3_NAMES, size_class3
from fsg_endo.engine.recipe import uses_gates
from fsg_endo.engine.schema import REGULARIZERS
from fsg_endo.errors import FsgEndoError
from fsg_endo.tracking.tracker import GATE_INIT_ARTIFACT, GRID_POINT_TAG, check_tracking_uri

STORE_FILE = "mlflow.db"
CELL = ("train_fraction", "grid_point", "fold", "seed")  # one sweep cell per regulariser
# run columns taken from params, with their types
PARAM_COLUMNS = {
    "data.train_fraction": ("train_fraction", float),
    "data.test_fold": ("fold", int),
    "seed": ("seed", int),
    "gates.sparsity_threshold": ("sparsity_threshold", float),
    "sweep.fold_role": ("fold_role", str),
}
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.npz$")


def find_store(start: str | os.PathLike | None = None) -> Path:
    """The nearest ``mlflow.db`` in ``start`` (default: the working directory) or a folder above it.

    Run from the repository root or from ``notebooks/``, this finds the repository's store.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / STORE_FILE).is_file():
            return folder / STORE_FILE
    raise FsgEndoError(f"{here}: no {STORE_FILE} here or above; run an experiment first or set MLFLOW_TRACKING_URI")


def default_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``MLFLOW_TRACKING_URI``, else the nearest ``mlflow.db`` (see :func:`find_store`)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{find_store()}"


def open_client(uri: str) -> mlflow.MlflowClient:
    """A client on an existing store: a missing SQLite file or a silent server is an error, not a new store."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise FsgEndoError(f"{path}: no such MLflow store (tracking URI {uri})")
    check_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The id of experiment ``name``; the error lists the experiments the store has."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise FsgEndoError(f"{client.tracking_uri}: no experiment {name!r} (the store has: {', '.join(names)})")
    return exp.experiment_id


def _run_row(run) -> dict:
    tags, params = run.data.tags, run.data.params
    row = {
        "run_id": run.info.run_id,
        "run_name": tags.get(MLFLOW_RUN_NAME, run.info.run_name),
        "status": run.info.status,
        "start_time": pd.to_datetime(run.info.start_time, unit="ms"),
        "parent_run_id": tags.get(MLFLOW_PARENT_RUN_ID),
        "regularizer": tags.get("regularizer"),
        "task": tags.get("task"),
        "grid_point": tags.get(GRID_POINT_TAG, ""),
    }
    for param, (column, kind) in PARAM_COLUMNS.items():
        row[column] = kind(params[param]) if param in params else np.nan
    if row["fold_role"] == "validation" and "data.val_fold" in params:  # a child of a sweep of validation folds
        row["fold"] = int(params["data.val_fold"])
    return row | run.data.metrics


def search_runs(client: mlflow.MlflowClient, experiment: str, filter_string: str = "") -> pd.DataFrame:
    """Every active run of ``experiment`` as one row (newest first): ids, status, tags, sweep axes, metrics."""
    exp_id, rows, token = experiment_id(client, experiment), [], None
    while True:
        page = client.search_runs([exp_id], filter_string, order_by=["attributes.start_time DESC"], page_token=token)
        rows += [_run_row(run) for run in page]
        token = page.token
        if not token:
            break
    columns = [
        "run_id",
        "run_name",
        "status",
        "start_time",
        "parent_run_id",
        "regularizer",
        "task",
        "grid_point",
        *(c for c, _ in PARAM_COLUMNS.values()),
    ]
    return pd.DataFrame(rows, columns=None if rows else columns)


def runs_by_id(client: mlflow.MlflowClient, run_ids: Iterable[str]) -> pd.DataFrame:
    """The named runs as rows, in the order given."""
    rows = []
    for run_id in run_ids:
        try:
            rows.append(_run_row(client.get_run(run_id)))
        except MlflowException:
            raise FsgEndoError(f"{client.tracking_uri}: no run with id {run_id}") from None
    return pd.DataFrame(rows)


def gated_runs(client: mlflow.MlflowClient, experiment: str, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Runs to inspect gates of: ``run_ids``, else the latest finished gated run of ``experiment`` first,
    followed by the latest finished run of each other gated regulariser (for a side-by-side view)."""
    if run_ids:
        return runs_by_id(client, run_ids)
    runs = search_runs(client, experiment, "attributes.status = 'FINISHED'")
    runs = runs[runs["regularizer"].fillna("").map(uses_gates)] if len(runs) else runs
    if runs.empty:
        raise FsgEndoError(
            f"{client.tracking_uri}: experiment {experiment!r} has no finished run with gates "
            f"(regularizer {', '.join(r for r in REGULARIZERS if uses_gates(r))})"
        )
    return runs.drop_duplicates("regularizer").reset_index(drop=True)  # newest first, so the latest of each


@contextmanager
def _download_quietly():
    """MLflow's progress bar off for the duration (one bar per small artifact floods notebook output)."""
    key, previous = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[key]
        else:
            os.environ[key] = previous


def load_gate_epochs(client: mlflow.MlflowClient, run_id: str) -> dict[int, dict[str, np.ndarray]]:
    """Every gate snapshot of a run, ``{epoch: {"attn_00": values, ...}}``, from ``gates/epoch_EEE.npz``."""
    files = {
        int(m.group(1)): a.path for a in client.list_artifacts(run_id, "gates") if (m := _EPOCH_FILE.search(a.path))
    }
    if not files:
        raise FsgEndoError(f"run {run_id}: no gates/epoch_EEE.npz artifacts (was it trained with gates?)")
    epochs = {}
    with tempfile.TemporaryDirectory() as tmp, _download_quietly():
        for epoch, path in sorted(files.items()):
            with np.load(client.download_artifacts(run_id, path, tmp)) as npz:
                epochs[epoch] = {key: npz[key] for key in sorted(npz.files)}
    return epochs


def load_gate_init(client: mlflow.MlflowClient, run_id: str) -> dict[str, np.ndarray]:
    """The gate values of a run at init, ``{"attn_00": values, ...}``, from ``gates/init.npz``."""
    with tempfile.TemporaryDirectory() as tmp, _download_quietly():
        try:
            path = client.download_artifacts(run_id, GATE_INIT_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise FsgEndoError(
                f"run {run_id}: no {GATE_INIT_ARTIFACT} artifact (trained before gates were logged at init?)"
            ) from None
        with np.load(path) as npz:
            return {key: npz[key] for key in sorted(npz.files)}


def gate_shift(epochs: Mapping[int, Mapping[str, np.ndarray]], init: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Per epoch, branch and layer: mean and max ``|g - g_init|`` of the gate logits ``g = logit(value)``
    (what ``gates/*/shift`` logs), and the std of that vector's init logits to weigh the movement against."""
    from scipy.special import logit

    rows = []
    for epoch, gates in epochs.items():
        for key, values in gates.items():
            branch, layer = key.rsplit("_", 1)
            start = logit(np.asarray(init[key], dtype=float))
            moved = np.abs(logit(np.asarray(values, dtype=float)) - start)
            rows.append(
                {
                    "epoch": epoch,
                    "branch": branch,
                    "layer": int(layer),
                    "shift": moved.mean(),
                    "shift_max": moved.max(),
                    "init_std": start.std(ddof=1),
                }
            )
    return pd.DataFrame(rows, columns=["epoch", "branch", "layer", "shift", "shift_max", "init_std"])


def gate_table(gates: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """One row per gate value: ``branch`` (attn, mlp), ``layer``, ``channel``, ``value``."""
    frames = []
    for key, values in gates.items():
        branch, layer = key.rsplit("_", 1)
        values = np.asarray(values, dtype=float).reshape(-1)
        frames.append(
            pd.DataFrame({"branch": branch, "layer": int(layer), "channel": np.arange(values.size), "value": values})
        )
    return pd.concat(frames, ignore_index=True)


def gate_sparsity(epochs: Mapping[int, Mapping[str, np.ndarray]], threshold: float = 0.1) -> pd.DataFrame:
    """Per epoch, branch and layer: mean gate value and sparsity (share of values below ``threshold``)."""
    frames = []
    for epoch, gates in epochs.items():
        table = gate_table(gates)
        table["closed"] = table["value"] < threshold
        stats = table.groupby(["branch", "layer"]).agg(mean=("value", "mean"), sparsity=("closed", "mean"))
        frames.append(stats.reset_index().assign(epoch=epoch))
    return pd.concat(frames, ignore_index=True)[["epoch", "branch", "layer", "mean", "sparsity"]]


def metric_history(client: mlflow.MlflowClient, run_id: str, keys: Iterable[str]) -> pd.DataFrame:
    """The logged history of each metric in ``keys``: columns ``key``, ``step``, ``value``."""
    rows = [
        {"key": key, "step": m.step, "value": m.value} for key in keys for m in client.get_metric_history(run_id, key)
    ]
    return pd.DataFrame(rows, columns=["key", "step", "value"])


def gate_metric_history(client: mlflow.MlflowClient, run_id: str, stat: str = "mean") -> pd.DataFrame:
    """The per-layer gate metric ``gates/{branch}/layer_LL/{stat}`` over steps: branch, layer, step, value."""
    pattern = re.compile(rf"gates/(attn|mlp)/layer_(\d+)/{re.escape(stat)}$")
    keys = sorted(k for k in client.get_run(run_id).data.metrics if pattern.match(k))
    history = metric_history(client, run_id, keys)
    parts = history["key"].str.extract(pattern)
    return history.assign(branch=parts[0], layer=parts[1].astype(int))[["branch", "layer", "step", "value"]]


def sweep_runs(
    client: mlflow.MlflowClient, experiment: str = "regularization_sweep", parent_run_id: str | None = None
) -> tuple[str, pd.DataFrame]:
    """The child runs of a sweep (default: the latest sweep of ``experiment``) and the parent's id."""
    if parent_run_id is None:
        parents = search_runs(client, experiment, "tags.regularizer = 'sweep'")
        if parents.empty:
            raise FsgEndoError(f"{client.tracking_uri}: experiment {experiment!r} has no sweep parent run")
        parent_run_id = parents["run_id"].iloc[0]
    children = search_runs(client, experiment, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'")
    if children.empty:
        raise FsgEndoError(f"{client.tracking_uri}: sweep run {parent_run_id} has no child runs")
    return parent_run_id, children


def latest_per_cell(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs only, and of a (regulariser, fraction, fold, seed) cell run more than once the latest."""
    done = runs[runs["status"] == "FINISHED"].sort_values("start_time", ascending=False)
    return done.drop_duplicates(["regularizer", *CELL]).reset_index(drop=True)


def is_validation(metric: str) -> bool:
    """Whether a metric is a validation one (``val/...``, ``lesion/val/...``), logged every evaluated epoch."""
    return metric.startswith("val/") or "/val/" in metric


def at_best_epoch(client: mlflow.MlflowClient, runs: pd.DataFrame, metric: str) -> pd.Series:
    """``metric`` of each run at its best epoch (the checkpoint it tested), read from its history; a run without
    a best epoch among its logged epochs (a baseline logs its metrics once) keeps its latest value."""
    values = runs[metric].copy()
    for i, run in runs.iterrows():
        if not np.isfinite(run.get("best_epoch", np.nan)):
            continue
        steps = {int(m.value): m.step for m in client.get_metric_history(run["run_id"], "epoch")}
        history = {m.step: m.value for m in client.get_metric_history(run["run_id"], metric)}
        step = steps.get(int(run["best_epoch"]))
        if step in history:
            values[i] = history[step]
    return values


def regularizer_order(names: Iterable[str]) -> list[str]:
    """Regularisers in the schema's order (none, dropout, fsg, fsg_gr), unknown names after them."""
    names = set(names)
    return [r for r in REGULARIZERS if r in names] + sorted(names - set(REGULARIZERS))


def group_keys(runs: pd.DataFrame) -> list[str]:
    """What the arms are tabulated by: regulariser and train fraction, and the grid point of a grid sweep."""
    grid = "grid_point" in runs and runs["grid_point"].fillna("").ne("").any()
    return ["regularizer", "train_fraction"] + (["grid_point"] if grid else [])


def summarize(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, std and count of each metric per (regulariser, train fraction[, grid point]), regularisers in
    the schema's order."""
    stats = runs.groupby(group_keys(runs))[list(metrics)].agg(["mean", "std", "count"])
    stats.columns = [f"{metric} {stat}" for metric, stat in stats.columns]
    order = regularizer_order(stats.index.get_level_values(0))
    return stats.reindex(order, level=0)


def wilcoxon_min_p(n_pairs: int) -> float:
    """The smallest two-sided p-value an exact Wilcoxon signed-rank test can give with ``n_pairs`` pairs."""
    return min(1.0, 2.0 / 2**n_pairs) if n_pairs else np.nan


def load_predictions(client: mlflow.MlflowClient, run_id: str, split: str = "test") -> pd.DataFrame:
    """The frame-level predictions a run logged as ``predictions/{split}.csv``."""
    with tempfile.TemporaryDirectory() as tmp, _download_quietly():
        try:
            path = client.download_artifacts(run_id, f"predictions/{split}.csv", tmp)
        except (MlflowException, OSError):
            raise FsgEndoError(f"run {run_id}: no predictions/{split}.csv artifact") from None
        return pd.read_csv(path)


def lesion_errors(client: mlflow.MlflowClient, runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per lesion of each run: its size class and error (mm off for regression, 1 if misclassified).

    A lesion's prediction is the task's aggregation of its frames, the mean (docs/interfaces.md#tasks-and-metrics).
    """
    from fsg_endo.engine.tasks import get_task

    frames = []
    for run in runs.itertuples(index=False):
        task = get_task(run.task)
        lesions = task.lesion_predictions(load_predictions(client, run.run_id, split))
        error = lesions["prediction"] - lesions["target"]
        lesions["error"] = np.abs(error) if task.kind == "regression" else (error != 0).astype(float)
        lesions["size_class"] = pd.Categorical(
            np.asarray(CLASS3_NAMES)[size_class3(lesions["size_mm"])], categories=CLASS3_NAMES, ordered=True
        )
        frames.append(
            lesions[["lesion_id", "size_mm", "size_class", "error"]].assign(
                run_id=run.run_id,
                regularizer=run.regularizer,
                train_fraction=run.train_fraction,
                fold=run.fold,
                seed=run.seed,
            )
        )
    return pd.concat(frames, ignore_index=True)
