"""A loaded sizing model on new rows: crops made with the model's own settings, predictions and metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fsg_endo.data.pipeline import build_dataset, make_loader
from fsg_endo.data.sizes import size_class2, size_class3
from fsg_endo.engine.evaluation import evaluate, predict
from fsg_endo.engine.export import PREPROCESS_KEYS
from fsg_endo.engine.tasks import Task, get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.tracking.model_store import LoadedModel

SIZING_TASKS = ("size_regression", "size_class3", "size_class2")


def model_task(model: LoadedModel) -> Task:
    """The sizing task the model was trained for (its outputs are read through it)."""
    name = model.metadata.get("task")
    if name not in SIZING_TASKS:
        raise FsgEndoError(f"model {model.uri}: task {name!r} is not a polyp sizing task ({', '.join(SIZING_TASKS)})")
    return get_task(name)


def loader_for(
    model: LoadedModel,
    rows: pd.DataFrame,
    root: str | Path,
    source: str = "frames",
    video: str | Path | None = None,
    batch_size: int = 64,
):
    """Un-augmented, uncached crops of ``rows``, cropped and normalised as the model was trained."""
    crop = {k: model.metadata[k] for k in PREPROCESS_KEYS}
    dataset = build_dataset(rows, root, train=False, cache="none", source=source, video=video, **crop)
    return make_loader(dataset, batch_size)


def evaluate_rows(model: LoadedModel, rows: pd.DataFrame, root: str | Path) -> tuple[dict[str, float], pd.DataFrame]:
    """``test/*`` and ``lesion/test/*`` metrics of the model on labelled manifest rows, and its frame predictions."""
    return evaluate(
        model.module,
        loader_for(model, rows, root),
        model_task(model),
        torch.device("cpu"),
        model.metadata["box_features"],
        "test",
    )


def size_rows(
    model: LoadedModel, rows: pd.DataFrame, root: str | Path, source: str = "frames", video: str | Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The model's sizes of ``rows`` (their ``size_mm`` is ignored): one table in the order of ``rows``, and
    one per lesion (the mean over its frames, as in evaluation) with ``lesion_id`` and ``n_frames``."""
    task = model_task(model)
    frames = predict(
        model.module,
        loader_for(model, rows, root, source, video),
        task,
        torch.device("cpu"),
        model.metadata["box_features"],
        desc="predict",
    )
    lesions = task.lesion_predictions(frames)
    return sized(task, frames), pd.concat([lesions[["lesion_id", "n_frames"]], sized(task, lesions)], axis=1)


def sized(task: Task, frames: pd.DataFrame) -> pd.DataFrame:
    """``size_mm, size_class3, size_class2`` (+ ``prob_k``) of a frame- or lesion-level prediction table."""
    pred = frames["prediction"].to_numpy(float)
    nan = np.full(len(pred), np.nan)
    if task.name == "size_regression":
        out = {"size_mm": pred, "size_class3": size_class3(pred), "size_class2": size_class2(pred)}
    elif task.name == "size_class3":
        out = {"size_mm": nan, "size_class3": pred, "size_class2": (pred == 2).astype(float)}
    else:
        out = {"size_mm": nan, "size_class3": nan, "size_class2": pred}
    table = pd.DataFrame(out, index=frames.index)
    for col in ("size_class3", "size_class2"):
        table[col] = table[col].astype("Int64") if table[col].notna().all() else table[col]
    probs = [c for c in frames.columns if c.startswith("prob_")]
    return pd.concat([table, frames[probs]], axis=1)
