"""Figures logged as MLflow artifacts: gate heatmap, confusion matrix, learning curves, sweep curves."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def to_png(figure) -> bytes:
    """Render ``figure`` to PNG bytes and close it (figures are not kept alive between epochs)."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buf.getvalue()


def gate_heatmap(values: Mapping[str, np.ndarray], title: str = ""):
    """Layer x channel heatmap of sigmoid(g), attention and MLP branches side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, branch in zip(axes, ("attn", "mlp")):
        keys = sorted(k for k in values if k.startswith(branch + "_"))
        grid = np.stack([np.asarray(values[k]) for k in keys]) if keys else np.zeros((1, 1))
        im = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{branch} gates")
        ax.set_xlabel("channel")
        ax.set_yticks(range(len(keys)), [k.split("_")[1] for k in keys])
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="sigmoid(g)")
    fig.suptitle(title)
    return fig


MAX_LABELLED_CLASSES = 20  # above this many classes the confusion matrix is drawn without counts and names


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = ""):
    """Confusion matrix with counts; rows are the true class (many classes: the picture only)."""
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(matrix, cmap="Blues")
    if len(class_names) <= MAX_LABELLED_CLASSES:
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, int(n), ha="center", va="center", color="black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=30)
        ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def learning_curves(history: pd.DataFrame, val_metric: str):
    """Training loss (and gate loss) per epoch next to the validation metric."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.2))
    for col in ("train/epoch_loss", "train/epoch_gate_loss"):
        if col in history and history[col].notna().any():
            ax_loss.plot(history["epoch"], history[col], marker="o", label=col)
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    if val_metric in history:
        ax_val.plot(history["epoch"], history[val_metric], marker="o", color="C2")
    ax_val.set_xlabel("epoch")
    ax_val.set_title(val_metric)
    return fig


def sweep_figure(summary: pd.DataFrame, metric: str):
    """Metric vs train fraction per regulariser, mean +/- std over folds and seeds."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ok = summary.dropna(subset=[metric])
    for reg, group in ok.groupby("regularizer"):
        stats = group.groupby("train_fraction")[metric].agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=reg)
    ax.set_xscale("log")
    ax.set_xlabel("train fraction (lesions)")
    ax.set_ylabel(metric)
    ax.legend()
    return fig


def report_figure(report: pd.DataFrame, metric: str):
    """Per reference arm: each arm's mean paired difference with its 95% CI, one marker colour per train fraction."""
    references = list(dict.fromkeys(report["reference"]))
    fig, axes = plt.subplots(1, len(references), figsize=(5.5 * len(references), 3.6), squeeze=False)
    labels = report["arm"] + (" " + report["grid_point"] if "grid_point" in report else "")
    for ax, reference in zip(axes[0], references):
        rows = report[report["reference"] == reference]
        names, fractions = list(dict.fromkeys(labels[rows.index])), sorted(rows["train_fraction"].unique())
        for k, (fraction, group) in enumerate(rows.groupby("train_fraction")):
            x = np.array([names.index(name) for name in labels[group.index]]) + 0.1 * (k - (len(fractions) - 1) / 2)
            err = np.abs(group[["diff_ci_low", "diff_ci_high"]].to_numpy().T - group["diff_mean"].to_numpy())
            ax.errorbar(
                x, group["diff_mean"], yerr=np.nan_to_num(err), fmt="o", capsize=3, label=f"fraction {fraction:g}"
            )
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(title=f"arm - {reference}", ylabel=f"{metric} difference")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def reconstruction_figure(images: np.ndarray, masked: np.ndarray, reconstructed: np.ndarray, title: str = ""):
    """A masked autoencoder's fixed batch: per row one crop, what the encoder saw, and the reconstruction.

    Each argument is (N, H, W, 3) in [0, 1]; hidden patches of ``masked`` are drawn grey."""
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(4.5, 1.5 * rows), squeeze=False)
    for row, pictures in enumerate(zip(images, masked, reconstructed)):
        for ax, picture, name in zip(axes[row], pictures, ("crop", "visible", "reconstruction")):
            ax.imshow(np.clip(picture, 0.0, 1.0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig
