"""Atomic training checkpoints, loaded back with ``weights_only=True``, and the progress they carry.

A checkpoint holds everything a resumed run needs to continue exactly where it stopped: model,
optimisers, schedulers, RNG states, :class:`Progress` (position in the epoch, running sums, history) and
:class:`Unpublished` (the metrics and gate vectors not yet confirmed by MLflow), the last two in its
``progress`` entry.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsg_endo.io import atomic_path
from fsg_endo.tracking.tracker import MetricRecord


@dataclass
class Progress:
    """Where a run stands. ``batch`` > 0 marks a checkpoint taken inside epoch ``epoch`` (0-based)."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimiser steps (the MLflow step)
    skipped: int = 0  # non-finite steps skipped so far
    best: float | None = None
    best_epoch: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # running sums of the current epoch
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    gate_init: dict[str, torch.Tensor] = field(default_factory=dict)  # gate logits at step 0 (what shift is from)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Progress:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass
class Unpublished:
    """What the next checkpoint covers but MLflow may not hold yet: the metric records logged since the last
    one, and the gate vectors of the epochs since. Written into the checkpoint (with every record the tracker
    has not confirmed), sent to MLflow right after it, and sent again when a run resumes from it: a resumed
    tracker drops every (key, step) the run already holds, so each is logged exactly once."""

    metrics: list[MetricRecord] = field(default_factory=list)
    gates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # epoch number -> gate vectors

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Unpublished:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_literal_tuple(state["python"]))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _literal_tuple(text: str):
    import ast

    value = ast.literal_eval(text)
    return (value[0], tuple(value[1]), value[2])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary file and rename it: a kill never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=device, weights_only=True)


def training_state(
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    progress: Progress,
    unpublished: Unpublished,
) -> dict[str, Any]:
    """The resumable state of a run, as :func:`save_checkpoint` stores it."""
    return {
        "model": model.state_dict(),
        "progress": progress.state_dict() | unpublished.state_dict(),
        "rng": rng_state(),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
    }


def restore_training_state(
    state: Mapping[str, Any],
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
) -> tuple[Progress, Unpublished]:
    """Load a :func:`training_state` into the run's objects and the RNGs; returns its progress and what it
    holds for MLflow."""
    model.load_state_dict(state["model"])
    for key, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][key])
        schedulers[key].load_state_dict(state["schedulers"][key])
    set_rng_state(state["rng"])
    return Progress.from_state_dict(state["progress"]), Unpublished.from_state_dict(state["progress"])
