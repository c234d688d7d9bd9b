"""Classical baselines of the sizing tasks: scikit-learn models on hand-made crop features.

``box`` sees only the box geometry; ``appearance`` adds the crop's colour, brightness and texture band
energies (:mod:`fsg_endo.data.crop_features`). Each is fit on the training rows of a split and scored
per frame and per lesion with the task's own metric functions, so its numbers sit beside a model's:
size regression is ridge on log size (its ``cls3_*`` metrics come from a triclass logistic regression
fit beside it), the class tasks are class-balanced logistic regression.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from fsg_endo.data.crop_features import CUES, crop_features
from fsg_endo.engine.arms import ARMS
from fsg_endo.engine.evaluation import lesion_counts, lesion_test_ci
from fsg_endo.engine.prepare import Splits, prepare_splits
from fsg_endo.engine.schema import Config
from fsg_endo.engine.tasks import ClassificationTask, Task, get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.tracking.tracker import Tracker

BASELINES: dict[str, tuple[str, ...]] = {"box": ("box",), "appearance": ("box", "colour", "brightness", "texture")}
# The baselines read one fixed crop whatever the model is given, so tuning a model never weakens them.
CROP = {"image_size": 64, "context": 0.5, "fov_mask": True}
TRICLASS = get_task("size_class3")


def columns_of(cues: Sequence[str]) -> list[str]:
    """The feature columns of some cues (names of :data:`fsg_endo.data.crop_features.CUES`)."""
    unknown = [c for c in cues if c not in CUES]
    if unknown:
        raise FsgEndoError(f"unknown baseline cue(s) {', '.join(unknown)}; choose from {', '.join(CUES)}")
    return [name for cue in cues for name in CUES[cue]]


def _classifier(seed: int) -> Pipeline:
    return make_pipeline(
        StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed)
    )


def _frame_table(task: Task, rows: pd.DataFrame, outputs: np.ndarray) -> pd.DataFrame:
    """The task's frame prediction table of some manifest rows, from the baseline's outputs."""
    batch = {k: rows[k].to_numpy() for k in ("lesion_id", "video_id", "frame_id", "size_mm")}
    if isinstance(task, ClassificationTask):
        batch[task.name] = rows[task.name].to_numpy()
    return task.frame_predictions(batch, outputs)


def _proba(model: Pipeline, x: np.ndarray, *, n_classes: int) -> np.ndarray:
    """Class probabilities over all ``n_classes`` (zero for a class the training rows lacked)."""
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def _metrics(task: Task, frames: pd.DataFrame, split: str) -> dict[str, float]:
    """``{split}/*`` per frame and ``lesion/{split}/*`` per lesion, as :func:`fsg_endo.engine.evaluation.evaluate`."""
    out = {f"{split}/{k}": v for k, v in task.compute_metrics(frames).items()}
    out.update({f"lesion/{split}/{k}": v for k, v in task.compute_metrics(task.lesion_predictions(frames)).items()})
    return out


def _fit(task: Task, x: np.ndarray, train: pd.DataFrame, seed: int) -> tuple[Callable, Callable | None]:
    """Fit the task's model on training features ``x``: features -> task outputs, and for regression the
    triclass classifier's features -> probabilities (None for the class tasks)."""
    if isinstance(task, ClassificationTask):
        model = _classifier(seed).fit(x, train[task.name].to_numpy(int))
        return partial(_proba, model, n_classes=task.num_outputs), None
    ridge = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x, np.log(train["size_mm"].to_numpy()))
    classifier = _classifier(seed).fit(x, train["size_class3"].to_numpy(int))
    return (lambda features: np.exp(ridge.predict(features))), partial(_proba, classifier, n_classes=3)


def evaluate_baseline(
    task: Task,
    splits: Mapping[str, pd.DataFrame],
    features: Mapping[str, pd.DataFrame],
    cues: Sequence[str],
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """Fit on ``splits["train"]``, score every other split: metrics and frame prediction tables per split.

    ``features[name]`` holds the feature rows of ``splits[name]`` (same order).
    """
    cols = columns_of(cues)
    predict, classify = _fit(task, features["train"][cols].to_numpy(float), splits["train"], seed)
    metrics, tables = {}, {}
    for split in (s for s in splits if s != "train"):
        x, rows = features[split][cols].to_numpy(float), splits[split]
        tables[split] = _frame_table(task, rows, predict(x))
        metrics.update(_metrics(task, tables[split], split))
        if classify is not None:
            classes = _frame_table(TRICLASS, rows, classify(x))
            metrics.update(
                {k.replace(f"{split}/", f"{split}/cls3_", 1): v for k, v in _metrics(TRICLASS, classes, split).items()}
            )
    return metrics, tables


def split_features(
    splits: Mapping[str, pd.DataFrame], root: Any, source: str = "frames", workers: int = 1
) -> dict[str, pd.DataFrame]:
    """The baseline features of every split's rows (:data:`CROP`)."""
    return {name: crop_features(rows, root, source=source, workers=workers, **CROP) for name, rows in splits.items()}


def baseline_metrics(
    cfg: Config, name: str, rows: Splits | None = None
) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """Baseline ``name`` fit on the training rows of a config's split, scored on its val and test rows."""
    rows = rows or prepare_splits(cfg)
    task = get_task(cfg.task, cfg.loss.main_weights, cfg.loss.gate_weights)
    features = split_features(rows.splits, rows.root, cfg.data.source_media, max(cfg.data.workers, 1))
    return evaluate_baseline(task, rows.splits, features, BASELINES[name], cfg.seed)


def fit_baseline(cfg: Config, tracker: Tracker) -> dict[str, float]:
    """A baseline arm's run (``regularizer: baseline_box|baseline_appearance``): seconds, no network.

    Logs the same metric names as a trained model's run, and its prediction tables.
    """
    rows = prepare_splits(cfg)
    tracker.set_tags({"data.manifest_sha256": rows.manifest_sha256})
    metrics, tables = baseline_metrics(cfg, baseline_of(cfg.regularizer), rows)
    task = get_task(cfg.task, cfg.loss.main_weights, cfg.loss.gate_weights)
    metrics |= lesion_test_ci(task, tables["test"], cfg.seed) | lesion_counts(rows.splits)
    tracker.log_metrics(metrics, 0)
    for split, frames in tables.items():
        tracker.log_text(frames.to_csv(index=False), f"predictions/{split}.csv")
    tracker.flush()
    return metrics


def baseline_of(regularizer: str) -> str | None:
    """The baseline of an arm (``baseline_box`` -> ``box``, :data:`fsg_endo.engine.arms.ARMS`), else None."""
    arm = ARMS.get(regularizer)
    return arm.baseline if arm else None
