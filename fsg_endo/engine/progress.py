"""Progress output that suits where it goes: tqdm bars on a terminal, one line per epoch in a log file.

A redirected tqdm bar writes every redraw (hundreds of kilobytes for a few minutes of training), so bars
are shown only when stderr is a terminal; otherwise the training loop prints one summary line per epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether progress goes to a terminal (tqdm writes to stderr)."""
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable, desc: str, enabled: bool = True) -> Iterable:
    """``iterable`` wrapped in a transient tqdm bar on a terminal, unchanged elsewhere."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not (enabled and interactive()))


def epoch_line(row: Mapping[str, float], epochs: int, metric: str) -> str:
    """One line summing up an epoch: loss, the selection metric when evaluated, and its wall time."""
    parts = [f"epoch {int(row['epoch'])}/{epochs}", f"loss {row['train/epoch_loss']:.4f}"]
    if metric in row:
        parts.append(f"{metric} {row[metric]:.4f}")
    parts.append(f"{row['perf/epoch_seconds']:.1f} s")
    return "  ".join(parts)


def report_epoch(row: Mapping[str, float], epochs: int, metric: str) -> None:
    """Print :func:`epoch_line` when there are no bars to watch (output to a file or pipe)."""
    if not interactive():
        print(epoch_line(row, epochs, metric), flush=True)
