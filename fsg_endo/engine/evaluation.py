"""Evaluation of a sizing model: frame predictions, frame- and lesion-level metrics, best-epoch selection."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from fsg_endo.engine.progress import progress_bar
from fsg_endo.engine.tasks import Task


def model_inputs(batch: Mapping[str, Any], device: torch.device, use_box: bool) -> tuple[torch.Tensor, ...]:
    """The model's inputs of a batch: the crops, and the box features when the model takes them; a text's tokens."""
    keys = ("input_ids", "attention_mask") if "input_ids" in batch else ("image", "box") if use_box else ("image",)
    return tuple(batch[key].to(device, non_blocking=True) for key in keys)


@torch.no_grad()
def predict(model: torch.nn.Module, loader, task: Task, device: torch.device, use_box: bool, desc: str) -> pd.DataFrame:
    """Frame-level predictions of ``model`` over ``loader`` (ids, target, prediction)."""
    model.eval()
    frames = []
    for batch in progress_bar(loader, desc):
        outputs = model(*model_inputs(batch, device, use_box))
        frames.append(task.frame_predictions(batch, task.outputs_to_numpy(outputs.float().cpu())))
    return pd.concat(frames, ignore_index=True)


def evaluate(model, loader, task: Task, device, use_box: bool, split: str) -> tuple[dict[str, float], pd.DataFrame]:
    """``{split}/*`` (per frame) and ``lesion/{split}/*`` (per lesion, if the task has lesions) metrics, and the
    frame predictions."""
    frames = predict(model, loader, task, device, use_box, desc=split)
    metrics = {f"{split}/{k}": v for k, v in task.compute_metrics(frames).items()}
    if task.lesion_level:
        lesions = task.lesion_predictions(frames)
        metrics.update({f"lesion/{split}/{k}": v for k, v in task.compute_metrics(lesions).items()})
    return metrics, frames


def validation_metrics(task: Task, split: str = "val") -> list[str]:
    """The metric names :func:`evaluate` returns for ``task`` on ``split``: the task's metrics of an empty
    prediction table, per frame and, for a task with lesions, per lesion."""
    names = list(task.compute_metrics(pd.DataFrame({"target": [], "prediction": []})))
    return [f"{split}/{k}" for k in names] + ([f"lesion/{split}/{k}" for k in names] if task.lesion_level else [])


def metric_mode(metric: str) -> str:
    """Errors and losses are minimised, everything else (accuracy, F1, AUROC) maximised."""
    return "min" if any(s in metric.rsplit("/", 1)[-1] for s in ("mae", "rmse", "loss")) else "max"


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` in ``mode`` ("min" or "max"); a non-finite value never does."""
    if not np.isfinite(value):
        return False
    return best is None or not np.isfinite(best) or (value < best if mode == "min" else value > best)


BOOTSTRAP_RESAMPLES = 2000


def video_sums(task: Task, lesions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per video (rows), the numerators and denominators whose pooled ratio is the task's main metric:
    absolute error and lesion count (MAE), or per class the correct and all lesions (balanced accuracy)."""
    videos = pd.factorize(lesions["video_id"])[0]
    target, prediction = lesions["target"].to_numpy(), lesions["prediction"].to_numpy()
    if task.kind == "regression":
        hits, counts = np.abs(prediction - target)[:, None], np.ones((len(lesions), 1))
    else:
        counts = np.eye(task.num_outputs)[target.astype(int)]
        hits = counts * (prediction == target)[:, None]
    num, den = np.zeros((videos.max() + 1, counts.shape[1])), np.zeros((videos.max() + 1, counts.shape[1]))
    np.add.at(num, videos, hits)
    np.add.at(den, videos, counts)
    return num, den


def pooled_metric(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """The metric of the videos stacked on the second-last axis: the mean over classes of pooled ratios."""
    den = den.sum(axis=-2)
    return np.nanmean(num.sum(axis=-2) / np.where(den > 0, den, np.nan), axis=-1)


def lesion_bootstrap_ci(
    task: Task, lesions: pd.DataFrame, seed: int = 0, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """Percentile bootstrap CI of the task's main metric over ``lesions``, resampling whole videos: lesions of
    one video share its patient and camera, so videos (clusters), not lesions, are the independent units."""
    from scipy import stats

    num, den = video_sums(task, lesions)
    if len(num) < 2:
        return math.nan, math.nan
    ci = stats.bootstrap(
        (np.arange(len(num)),),
        lambda v, axis=-1: pooled_metric(num[v], den[v]),
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(ci.low), float(ci.high)


def lesion_test_ci(task: Task, frames: pd.DataFrame, seed: int) -> dict[str, float]:
    """``lesion/test/<main metric>_ci_low|_ci_high`` of a run's test frame predictions (polyp tasks only)."""
    if not task.lesion_level:
        return {}
    low, high = lesion_bootstrap_ci(task, task.lesion_predictions(frames), seed=seed)
    return {f"lesion/test/{task.main_metric}_ci_low": low, f"lesion/test/{task.main_metric}_ci_high": high}


def lesion_counts(splits: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    """``data/{train,val,test}_lesions``: the split sizes the report's corrected t-test reads."""
    if any("lesion_id" not in splits[name] for name in ("train", "val", "test")):
        return {}
    return {f"data/{name}_lesions": float(splits[name]["lesion_id"].nunique()) for name in ("train", "val", "test")}
