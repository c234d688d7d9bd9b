"""Metric functions (docs/interfaces.md#tasks-and-metrics) on plain arrays (numpy + scikit-learn, no torch).

Every function returns plain Python floats so the results go straight to MLflow and CSV files.
Metrics that are undefined for the given data (e.g. AUROC with one class present) are NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

WITHIN_TOLERANCE_MM = 1.0
_NAME_REPLACEMENTS = ((">=", "ge"), ("<=", "le"), (">", "gt"), ("<", "lt"))


def metric_key(name: str) -> str:
    """A class name as an MLflow-safe metric key part: ``"<10mm"`` -> ``"lt10mm"``, ``">=10mm"`` -> ``"ge10mm"``."""
    for symbol, word in _NAME_REPLACEMENTS:
        name = name.replace(symbol, word)
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def regression_metrics(y_true_mm: Sequence[float], y_pred_mm: Sequence[float]) -> dict[str, float]:
    """MAE and RMSE in mm, and ``within_1mm``: the share of predictions with ``|error| <= 1`` mm."""
    err = np.asarray(y_pred_mm, dtype=float) - np.asarray(y_true_mm, dtype=float)
    if err.size == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "within_1mm": float("nan")}
    abs_err = np.abs(err)
    return {
        "mae": float(abs_err.mean()),
        "rmse": float(np.sqrt(np.mean(err**2))),
        # the tolerance absorbs float noise such as 2.2 - 1.2 = 1.0000000000000002
        "within_1mm": float(np.mean(abs_err <= WITHIN_TOLERANCE_MM + 1e-9)),
    }


def classification_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    n_classes: int,
    prob: np.ndarray | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1, ``f1_<name>`` per class, and ``auroc`` when binary.

    Balanced accuracy averages recall over the classes present in ``y_true``. A class absent from
    both ``y_true`` and ``y_pred`` has F1 NaN and is left out of the macro mean. ``prob`` is (N, C)
    probabilities or, for binary tasks, an (N,) score of class 1; AUROC is NaN with one class present.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    names = [metric_key(n) for n in names] if names is not None else [str(k) for k in range(n_classes)]
    labels = list(range(n_classes))
    out = {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "macro_f1": float("nan")}
    out.update({f"f1_{name}": float("nan") for name in names})
    if n_classes == 2:
        out["auroc"] = float("nan")
    if y_true.size == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on classes missing from y_true or y_pred
        out["accuracy"] = float(skm.accuracy_score(y_true, y_pred))
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, y_pred))
        per_class = skm.f1_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    out["macro_f1"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    out.update({f"f1_{name}": float(f) for name, f in zip(names, per_class)})
    if n_classes == 2 and prob is not None and len(np.unique(y_true)) == 2:
        score = np.asarray(prob, dtype=float)
        out["auroc"] = float(skm.roc_auc_score(y_true, score[:, 1] if score.ndim == 2 else score))
    return out


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class, columns = predicted; absent classes keep a row."""
    return skm.confusion_matrix(
        np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int), labels=list(range(n_classes))
    )
