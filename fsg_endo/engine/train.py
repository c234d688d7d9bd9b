"""The training loop: one run of one resolved config, readable top to bottom.

Recipe (model, optimisers, schedules, the step: Gradient Routing for ``fsg_gr``) -> resume from the last
checkpoint if the run has one -> epochs of steps -> per epoch: validation and best checkpoint, the last
checkpoint, then the epoch's metrics and gate artifacts to MLflow -> test with the best weights.

What MLflow holds always corresponds to a checkpoint. The metrics of the steps since the last checkpoint
wait in :class:`~fsg_endo.engine.checkpoint.Unpublished`; they are written into the next checkpoint and sent
to MLflow right after it.
A run killed at any point resumes from its last checkpoint, re-does the steps after it (exactly: RNGs,
sampler and augmentation seeds are part of the state) and logs them once, because a resumed tracker drops
every (key, step) the run already holds and the checkpoint re-sends what MLflow may have missed.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from monai.utils import set_determinism

from fsg_endo.engine.bundle import DataBundle
from fsg_endo.engine.checkpoint import (
    Progress,
    Unpublished,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from fsg_endo.engine.distributed import SINGLE, DistContext
from fsg_endo.engine.evaluation import evaluate, is_better, lesion_test_ci, model_inputs
from fsg_endo.engine.export import log_trained_model
from fsg_endo.engine.interrupt import RunInterrupted, StopSignals
from fsg_endo.engine.progress import progress_bar, report_epoch
from fsg_endo.engine.recipe import Recipe, build_recipe
from fsg_endo.engine.schema import Config
from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import gate_logits, gate_statistics, gate_values
from fsg_endo.tracking import plots
from fsg_endo.tracking.tracker import Tracker, metric_records


def fit(
    cfg: Config,
    data: DataBundle,
    tracker: Tracker,
    run_dir: Path,
    ctx: DistContext = SINGLE,
    stop: StopSignals | None = None,
) -> dict[str, float]:
    """Train (or resume), select the best epoch on validation, test it, log everything; returns the final
    metrics (on rank 0; other ranks of a torchrun job return an empty dict)."""
    stop = stop or StopSignals()
    set_determinism(seed=cfg.seed)
    r = build_recipe(
        cfg,
        ctx,
        steps_per_epoch=len(data.loaders["train"]),
        class_names=data.class_names,
        train_rows=data.splits.get("train"),
    )
    progress, unpublished = Progress(gate_init=gate_logits(r.model)), Unpublished()
    if (run_dir / LAST).exists():
        state = load_checkpoint(run_dir / LAST, r.device)
        progress, unpublished = restore_training_state(state, r.model, r.optimizers, r.schedulers)
        publish(tracker, unpublished, cfg)  # what the checkpoint covers and MLflow may have missed
    if r.gated and ctx.is_main:
        tracker.log_gate_init(gate_values_of(progress.gate_init))

    loop = Loop(r, data, tracker, ctx, stop, run_dir, progress, unpublished, Clock(tracker))
    with stop.deferred():
        for _ in range(progress.epoch, cfg.optim.epochs):
            train_epoch(loop)
            end_epoch(loop)
            if progress.epoch % cfg.checkpoint.every == 0 or progress.epoch == cfg.optim.epochs:
                checkpoint(loop)
            if should_stop(loop):
                stop_run(loop)
    return finish(loop) if ctx.is_main else {}


LAST, BEST = "last.pt", "best.pt"  # the checkpoints in a run's folder


@dataclass
class Loop:
    """What the loop's helpers share: the run's recipe, data and tracker, where it stands (``progress``,
    checkpointed) and what MLflow has yet to get (``unpublished``, checkpointed with it)."""

    r: Recipe
    data: DataBundle
    tracker: Tracker
    ctx: DistContext
    stop: StopSignals
    run_dir: Path
    progress: Progress
    unpublished: Unpublished
    clock: Clock

    @property
    def cfg(self) -> Config:
        return self.r.cfg


def train_epoch(loop: Loop) -> None:
    """The steps of epoch ``progress.epoch`` from batch ``progress.batch`` on; step metrics wait in
    ``loop.unpublished``."""
    r, progress, cfg = loop.r, loop.progress, loop.cfg
    loop.data.set_epoch(progress.epoch, progress.batch)
    r.model.train()
    sums = progress.sums or {"loss": 0.0, "gate_loss": 0.0, "steps": 0}
    progress.sums = sums
    desc = f"epoch {progress.epoch + 1}/{cfg.optim.epochs}"
    for batch in progress_bar(loop.data.loaders["train"], desc, enabled=loop.ctx.is_main):
        out = r.step(model_inputs(batch, r.device, r.use_box), r.task.targets(batch).to(r.device))
        for scheduler in r.schedulers.values():
            scheduler.step()
        progress.step += 1
        progress.batch += 1
        # the loss of the global batch, and whether any rank was asked to stop: one all-reduce
        stopping = loop.stop.requested is not None or loop.tracker.failed
        loss, gate_loss, stopping = loop.ctx.all_sum([out["loss"], out.get("gate_loss", math.nan), stopping], r.device)
        loss, gate_loss = loss / loop.ctx.world_size, gate_loss / loop.ctx.world_size
        if out["skipped"]:
            progress.skipped += 1
            if progress.skipped > cfg.optim.max_skipped_steps:
                raise FsgEndoError(
                    f"{progress.skipped} training steps had a non-finite loss or gradient (NaN/Inf), "
                    f"more than optim.max_skipped_steps = {cfg.optim.max_skipped_steps}; "
                    f"stopped in epoch {progress.epoch + 1} at step {progress.step}"
                )
        else:
            sums["loss"] += loss
            sums["gate_loss"] += gate_loss
            sums["steps"] += 1
            log_step(loop, loss, gate_loss)
        if stopping:
            stop_run(loop)


def log_step(loop: Loop, loss: float, gate_loss: float) -> None:
    """The step's training metrics, and the gate statistics every ``gates.log_every`` steps."""
    step, cfg = loop.progress.step, loop.cfg
    if step % cfg.tracking.log_every == 0:
        lr = loop.r.schedulers["main"].get_last_lr()[0]
        loop.unpublished.metrics += metric_records(
            {"train/loss": loss, "train/gate_loss": gate_loss, "train/lr": lr}, step
        )
    if loop.r.gated and step % cfg.gates.log_every == 0:
        loop.unpublished.metrics += metric_records(gate_stats(loop.r, loop.progress), step)


def gate_stats(r: Recipe, progress: Progress) -> dict[str, float]:
    """The gate statistics, with each vector's shift from its init."""
    return gate_statistics(r.model, r.cfg.gates.sparsity_threshold, progress.gate_init)


def gate_values_of(logits: Mapping[str, Any]) -> dict[str, Any]:
    """Gate logits as the values a snapshot stores: ``sigmoid(g)``."""
    return {key: g.sigmoid() for key, g in logits.items()}


def end_epoch(loop: Loop) -> None:
    """Epoch means, gate statistics and vectors, validation and the best checkpoint (rank 0)."""
    r, progress, cfg = loop.r, loop.progress, loop.cfg
    epoch, sums = progress.epoch + 1, progress.sums
    row = {
        "epoch": epoch,
        "train/epoch_loss": sums["loss"] / max(sums["steps"], 1),
        "train/epoch_gate_loss": sums["gate_loss"] / max(sums["steps"], 1),
        "train/skipped_steps": progress.skipped,
    }
    if r.gated:
        if progress.step % cfg.gates.log_every:  # not already logged at this step
            row.update(gate_stats(r, progress))
        loop.unpublished.gates[str(epoch)] = gate_values(r.model)
    if loop.ctx.is_main and (epoch % cfg.eval.every == 0 or epoch == cfg.optim.epochs):
        val_metrics, _ = evaluate(r.model, loop.data.loaders["val"], r.task, r.device, r.use_box, "val")
        row.update(val_metrics)
        if is_better(val_metrics.get(r.metric, math.nan), progress.best, r.mode):
            progress.best, progress.best_epoch = val_metrics[r.metric], epoch
            save_checkpoint(loop.run_dir / BEST, {"model": r.model.state_dict(), "epoch": epoch})
    if loop.ctx.is_main and cfg.tracking.plots:
        for path, figure in r.task.figures(r.model, loop.data.loaders["val"], epoch, r.device).items():
            loop.tracker.log_figure(figure, path)
    row.update(loop.clock.lap())
    if loop.ctx.is_main:
        report_epoch(row, cfg.optim.epochs, r.metric)
    progress.epoch, progress.batch, progress.sums = epoch, 0, {}
    progress.history.append({k: float(v) for k, v in row.items()})
    loop.unpublished.metrics += metric_records(row, progress.step)


def checkpoint(loop: Loop) -> None:
    """Write the last checkpoint (rank 0) with every metric MLflow has not confirmed, then publish them."""
    r, unpublished = loop.r, loop.unpublished
    if loop.ctx.is_main:
        unpublished.metrics = loop.tracker.unconfirmed() + unpublished.metrics
        state = training_state(r.model, r.optimizers, r.schedulers, loop.progress, unpublished)
        save_checkpoint(loop.run_dir / LAST, state)
    if not loop.tracker.failed:
        publish(loop.tracker, unpublished, loop.cfg)


def publish(tracker: Tracker, unpublished: Unpublished, cfg: Config) -> None:
    """Send the metrics and gate vectors a checkpoint covers to MLflow (asynchronous metrics, then artifacts)."""
    tracker.log_records(unpublished.metrics)
    for epoch, values in sorted(unpublished.gates.items(), key=lambda item: int(item[0])):
        tracker.log_gate_epoch(values, int(epoch), plot=cfg.tracking.plots)
    unpublished.metrics, unpublished.gates = [], {}


def should_stop(loop: Loop) -> bool:
    """Whether any rank was asked to stop (a signal) or lost its tracking store."""
    asked = loop.stop.requested is not None or loop.tracker.failed
    return loop.ctx.all_sum([asked], loop.r.device)[0] > 0


def stop_run(loop: Loop) -> None:
    """Checkpoint where the loop stands, then raise why it stopped: a tracking outage or a signal."""
    checkpoint(loop)
    if loop.tracker.failed:
        raise loop.tracker.error
    signum = loop.stop.requested or signal.SIGTERM
    raise RunInterrupted(
        signum,
        f"interrupted by {signal.Signals(signum).name}; checkpoint {loop.run_dir / LAST} saved at "
        f"step {loop.progress.step}; resume with --resume {loop.tracker.run_id}",
    )


class Clock:
    """Wall time and tracker time between laps: ``perf/epoch_seconds`` and ``perf/logging_share``."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.start, self.logged = time.perf_counter(), tracker.seconds

    def lap(self) -> dict[str, float]:
        now, logged = time.perf_counter(), self.tracker.seconds
        seconds = now - self.start
        self.start, self.logged, share = now, logged, (logged - self.logged) / seconds
        return {"perf/epoch_seconds": seconds, "perf/logging_share": share}


def gate_movement(r: Recipe, progress: Progress) -> dict[str, float]:
    """How far the (best) gates moved from init, and the spread of the init logits to weigh it against."""
    stats = gate_stats(r, progress)
    init = torch.cat([g.float().flatten() for g in progress.gate_init.values()])
    return {
        "gates/all/shift": stats["gates/all/shift"],
        "gates/all/shift_max": stats["gates/all/shift_max"],
        "gates/init/std": init.std().item(),
    }


def finish(loop: Loop) -> dict[str, float]:
    """Test the best checkpoint on val and test, with a bootstrap CI of the lesion-level headline metric over
    test videos; log predictions, plots and the model. The results add how far the best gates moved."""
    r, tracker, progress, cfg, model = loop.r, loop.tracker, loop.progress, loop.cfg, loop.r.model
    if (loop.run_dir / BEST).exists():
        model.load_state_dict(load_checkpoint(loop.run_dir / BEST, r.device)["model"])
    results: dict[str, float] = {"best_epoch": progress.best_epoch}
    tables = {}
    for split in ("val", "test"):
        metrics, tables[split] = evaluate(model, loop.data.loaders[split], r.task, r.device, r.use_box, split)
        results.update(metrics)
        tracker.log_text(tables[split].to_csv(index=False), f"predictions/{split}.csv")
    frames = tables["test"]
    results |= lesion_test_ci(r.task, frames, cfg.seed)
    tracker.log_metrics(
        {k: v for k, v in results.items() if k.startswith(("test/", "lesion/test/"))}
        | {"best_epoch": progress.best_epoch},
        progress.step,
    )
    if r.gated:
        results |= gate_movement(r, progress)
    if cfg.tracking.plots and r.task.class_names:
        tracker.log_figure(
            plots.confusion_figure(r.task.confusion(frames), r.task.class_names, "test, per frame"),
            "plots/confusion_test.png",
        )
        tracker.log_figure(plots.learning_curves(pd.DataFrame(progress.history), r.metric), "plots/learning_curves.png")
    if cfg.tracking.log_model:
        log_trained_model(tracker, model, cfg, r.task, loop.data.preprocess, progress.step)
    tracker.flush()
    return results
