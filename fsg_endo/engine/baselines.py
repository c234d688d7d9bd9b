"""Box-size-only baseline: how much of the size class the box geometry alone gives away.

A polyp's box shrinks with its distance to the camera, so the box alone should be an ambiguous
cue for the physical size; this baseline measures how ambiguous (grouped by video, as the models are).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

BOX_FEATURES = ("log_box_width", "log_box_height", "log_box_area")
N_CLASSES = 3


def box_features(manifest: pd.DataFrame) -> pd.DataFrame:
    """Log of box width, height and area relative to the frame (one row per manifest row)."""
    w = (manifest["xmax"] - manifest["xmin"]) / manifest["width"]
    h = (manifest["ymax"] - manifest["ymin"]) / manifest["height"]
    return pd.DataFrame({"log_box_width": np.log(w), "log_box_height": np.log(h), "log_box_area": np.log(w * h)},
                        index=manifest.index)


def grouped_folds(manifest: pd.DataFrame, n_splits: int = 5) -> np.ndarray:
    """Fold of every row: the manifest's ``fold`` column, else GroupKFold by ``video_id``."""
    if "fold" in manifest and manifest["fold"].nunique() > 1:
        return manifest["fold"].to_numpy()
    n_splits = min(n_splits, manifest["video_id"].nunique())
    folds = np.zeros(len(manifest), int)
    for k, (_, test) in enumerate(GroupKFold(n_splits).split(manifest, groups=manifest["video_id"])):
        folds[test] = k
    return folds


def cross_validated_proba(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities of a standardised, class-balanced logistic regression."""
    proba = np.zeros((len(labels), N_CLASSES))
    for k in np.unique(folds):
        test = folds == k
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000,
                                                                   random_state=seed))
        model.fit(features[~test], labels[~test])
        proba[np.ix_(test, model.classes_)] = model.predict_proba(features[test])
    return proba


def lesion_balanced_accuracy(manifest: pd.DataFrame, proba: np.ndarray) -> float:
    """Balanced accuracy of lesion predictions (mean probability over each lesion's frames)."""
    per_lesion = pd.DataFrame(proba, index=manifest["lesion_id"].to_numpy()).groupby(level=0).mean()
    truth = manifest.groupby("lesion_id")["size_class3"].first().loc[per_lesion.index]
    return float(balanced_accuracy_score(truth, per_lesion.to_numpy().argmax(axis=1)))


def box_only_baseline(manifest: pd.DataFrame, seed: int = 0) -> dict:
    """Triclass balanced accuracy of a classifier that sees only the box size, by video-grouped CV.

    Returns frame- and lesion-level balanced accuracy next to chance (1/3), and the counts used.
    """
    labels = manifest["size_class3"].to_numpy()
    folds = grouped_folds(manifest)
    proba = cross_validated_proba(box_features(manifest).to_numpy(), labels, folds, seed)
    return {"balanced_accuracy": float(balanced_accuracy_score(labels, proba.argmax(axis=1))),
            "lesion_balanced_accuracy": lesion_balanced_accuracy(manifest, proba),
            "chance": 1.0 / N_CLASSES, "frames": int(len(manifest)),
            "lesions": int(manifest["lesion_id"].nunique()), "folds": int(len(np.unique(folds))),
            "features": list(BOX_FEATURES)}
