"""``fsg-endo evaluate``: a logged sizing model on every annotated box of a dataset (or one of its folds).

The model crops and normalises the new dataset with the settings stored in it. The result is a new MLflow
run in the model's experiment, tagged ``evaluates=<trained run id>`` and ``dataset=<format>``, with the
usual ``test/*`` and ``lesion/test/*`` metrics, the predictions and the confusion plot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from fsg_endo.data.manifest import assign_folds, detect_format, load_manifest, read_dataset
from fsg_endo.engine.inference import evaluate_rows, model_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.launch import REPORT_METRICS, results_table
from fsg_endo.experiment.runs import end_run
from fsg_endo.tracking import plots
from fsg_endo.tracking.model_store import LoadedModel, load_model
from fsg_endo.tracking.tracker import Tracker, check_tracking_uri, git_commit, resolve_tracking_uri, source_tags


@dataclass
class Evaluation:
    """What ``fsg-endo evaluate`` reports: the metrics, their table, and the MLflow run that holds them."""

    metrics: dict[str, float]
    table: pd.DataFrame
    run_id: str
    rows: int
    lesions: int


def dataset_rows(
    model: LoadedModel, root: Path, fmt: str, sizes: str | None, manifest: str | None, fold: int | None
) -> pd.DataFrame:
    """The rows to test on: the manifest's, or the dataset root read in layout ``fmt``; only fold ``fold`` if given
    (folds of a root are made as in training: the model's fold count and seed)."""
    if manifest:
        rows = load_manifest(manifest, root=root)
    else:
        rows = read_dataset(fmt, root, sizes)
        if fold is not None:
            rows["fold"] = assign_folds(rows, model.metadata["folds"], model.metadata["seed"])
    if fold is not None:
        rows = rows[rows["fold"] == fold].reset_index(drop=True)
        if rows.empty:
            raise FsgEndoError(f"{manifest or root}: fold {fold} has no rows")
    return rows


def model_experiment(client: mlflow.MlflowClient, model: LoadedModel) -> str:
    """The experiment of the model's training run; the one named in its metadata when the run is elsewhere."""
    if model.run_id:
        try:
            return client.get_experiment(client.get_run(model.run_id).info.experiment_id).name
        except MlflowException:
            pass
    return model.metadata["experiment"]


def evaluate_model(
    model_uri: str,
    data_root: str,
    fmt: str | None = None,
    sizes: str | None = None,
    manifest: str | None = None,
    fold: int | None = None,
    tracking_uri: str | None = None,
) -> Evaluation:
    """Test the model at ``model_uri`` on a dataset and log the result as a new run (see the module doc)."""
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    root = Path(data_root)
    if not root.is_dir():
        raise FsgEndoError(f"{root}: dataset root does not exist")
    fmt = fmt or detect_format(root)
    model = load_model(model_uri, uri)
    task = model_task(model)
    rows = dataset_rows(model, root, fmt, sizes, manifest, fold)
    metrics, frames = evaluate_rows(model, rows, root)

    tags = {
        "evaluates": model.run_id or "",
        "dataset": fmt,
        "task": task.name,
        "regularizer": model.metadata["regularizer"],
        "git_commit": git_commit(),
        **source_tags("fsg-endo evaluate"),
    }
    params = {
        "model_uri": model_uri,
        "data.root": str(root.resolve()),
        "data.source": fmt,
        "data.manifest": manifest,
        "data.sizes": sizes,
        "data.fold": fold,
    }
    name = f"evaluate-{fmt}-{root.name}" + ("" if fold is None else f"-fold{fold}")
    tracker = Tracker.start(
        uri, model_experiment(mlflow.MlflowClient(uri), model), run_name=name, tags=tags, params=params
    )
    try:
        tracker.log_dataset(
            rows, source=str(Path(manifest or root).resolve()), name=f"{fmt}-{root.name}", context="test"
        )
        tracker.log_metrics(metrics, 0)
        tracker.log_text(frames.to_csv(index=False), "predictions/test.csv")
        tracker.log_figure(
            plots.confusion_figure(task.confusion(frames), task.class_names, f"{fmt}, per frame"),
            "plots/confusion_test.png",
        )
    except BaseException:
        end_run(tracker, "FAILED")
        raise
    tracker.end("FINISHED")
    table = results_table(metrics, REPORT_METRICS[task.name])
    return Evaluation(metrics, table, tracker.run_id, len(rows), rows["lesion_id"].nunique())
