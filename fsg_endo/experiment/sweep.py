"""The regularisation sweep: one parent MLflow run, one nested child per (regularizer, fraction, grid point, fold,
seed); the parent also holds the statistical report of its children."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fsg_endo.engine.distributed import SINGLE, DistContext
from fsg_endo.engine.interrupt import StopSignals
from fsg_endo.engine.schema import Config
from fsg_endo.experiment.config import revalidate, set_in
from fsg_endo.experiment.executors import SWEEP_KEY_TAG, Child, open_executor
from fsg_endo.experiment.report import log_report
from fsg_endo.experiment.runs import (
    end_run,
    grid_point,
    open_run,
    record_config,
    run_dir_for,
    run_name,
    swept_fold,
)
from fsg_endo.tracking import plots
from fsg_endo.tracking.tracker import Tracker, TrackingError


def grid_points(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the ``sweep.grid`` values, ``[{}]`` without a grid."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def child_configs(cfg: Config) -> Iterator[Config]:
    """Every child config of the sweep, in a stable order: one per (regularizer, train fraction, variant, grid
    point, fold, seed). ``sweep.fold_role`` test: the fold is the test fold and the one after it validates;
    validation: the fold validates and every child keeps ``data.test_fold``. ``sweep.seed_role`` training: every
    seed keeps the base seed's data and folds (``data.synthetic_seed``, ``data.split_seed``)."""
    sweep = cfg.sweep
    variants = [sweep.variant] if sweep.variant else list(sweep.variants) or [None]
    for reg, frac, variant, point, fold, seed in itertools.product(
        sweep.regularizers, sweep.train_fractions, variants, grid_points(sweep.grid), sweep.folds, sweep.seeds
    ):
        data = cfg.data.model_copy(update={"train_fraction": frac} | held_out(cfg, fold) | fixed_data(cfg))
        child = cfg.model_copy(
            update={
                "regularizer": reg,
                "seed": seed,
                "data": data,
                "sweep": sweep.model_copy(update={"enabled": False, "variant": variant}),
            }
        )
        for key, value in point.items():
            child = set_in(child, key, value)
        yield revalidate(child)  # applies the variant's overrides


def held_out(cfg: Config, fold: int) -> dict[str, int]:
    """The data keys of a child on sweep fold ``fold``, by ``sweep.fold_role``."""
    if cfg.sweep.fold_role == "validation":
        return {"val_fold": fold}
    return {"test_fold": fold, "val_fold": (fold + 1) % cfg.data.folds}


def fixed_data(cfg: Config) -> dict[str, int]:
    """``sweep.seed_role`` training: the generator and split seeds of the base config, whatever a child's seed."""
    if cfg.sweep.seed_role == "all":
        return {}
    d = cfg.data
    return {
        "synthetic_seed": cfg.seed if d.synthetic_seed is None else d.synthetic_seed,
        "split_seed": cfg.seed if d.split_seed is None else d.split_seed,
    }


def existing_children(parent: Tracker) -> dict[str, dict[str, Any]]:
    """Child runs of a parent by sweep key: run id, status, metrics and checkpoint folder (to resume a sweep)."""
    run = parent.client.get_run(parent.run_id)
    children = parent.client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    return {
        r.data.tags[SWEEP_KEY_TAG]: {
            "run_id": r.info.run_id,
            "status": r.info.status,
            "metrics": dict(r.data.metrics),
            "checkpoint_dir": r.data.tags.get("checkpoint_dir"),
        }
        for r in children
        if SWEEP_KEY_TAG in r.data.tags
    }


def open_parent(cfg: Config, uri: str, resume_run_id: str | None) -> Tracker:
    """Start the sweep's parent run, or reopen it to resume the sweep."""
    if resume_run_id:
        return Tracker.start(uri, cfg.name, resume_run_id=resume_run_id)
    params = {f"sweep.{k}": str(v) for k, v in cfg.sweep.model_dump().items()}
    params["sweep.children"] = len(list(child_configs(cfg)))
    return Tracker.start(
        uri, cfg.name, run_name="sweep", params=params, tags={"task": cfg.task, "regularizer": "sweep"}
    )


def cell(child: Config) -> dict[str, Any]:
    """The grid cell of a child config: its row in the sweep summary."""
    return {
        "regularizer": child.regularizer,
        "train_fraction": child.data.train_fraction,
        "grid_point": grid_point(child),
        "fold": swept_fold(child),
        "seed": child.seed,
    }


def run_sweep(
    cfg: Config,
    uri: str,
    resume_run_id: str | None = None,
    ctx: DistContext = SINGLE,
    stop: StopSignals | None = None,
    ray_address: str | None = None,
) -> pd.DataFrame:
    """Run every child with the executor of ``sweep.executor``, or resume the sweep: FINISHED children are kept,
    the others continue in their own run from their last checkpoint. A failed child is recorded, the sweep goes on."""
    executor = open_executor(cfg.sweep, uri, ctx, ray_address)  # before any work: a cluster may refuse the store
    try:
        parent = open_run(ctx, lambda: open_parent(cfg, uri, resume_run_id))
        if ctx.is_main:
            record_config(cfg, parent, run_dir_for(cfg, parent.run_id))
        done = ctx.broadcast(existing_children(parent) if ctx.is_main and resume_run_id else {})
        configs = {run_name(child): child for child in child_configs(cfg)}
        rows, todo = {}, []
        for key, child in configs.items():
            previous = done.get(key)
            if previous is not None and previous["status"] == "FINISHED":
                rows[key] = cell(child) | {"run_id": previous["run_id"], "status": "FINISHED"} | previous["metrics"]
            else:
                folder = previous and previous["checkpoint_dir"]
                todo.append(Child(key, child, previous and previous["run_id"], Path(folder) if folder else None))
        try:
            for out in executor.run(todo, parent.run_id, stop or StopSignals()):
                rows[out.key] = (
                    cell(configs[out.key])
                    | {"run_id": out.run_id, "status": out.status}
                    | out.results
                    | ({"error": out.error} if out.error else {})
                )
        except (KeyboardInterrupt, TrackingError):
            end_run(parent, "KILLED")
            raise
    finally:
        executor.close()
    summary = pd.DataFrame([rows[key] for key in configs])
    if ctx.is_main:
        log_summary(parent, summary, main_metric(cfg))
    parent.end("FINISHED")
    return summary


def log_summary(parent: Tracker, summary: pd.DataFrame, metric: str) -> None:
    """``sweep/summary.csv``, the failed-children tags, the headline metric against the train fraction and
    the paired report of the arms (``sweep/report.{csv,md,png}``)."""
    parent.log_text(summary.to_csv(index=False), "sweep/summary.csv")
    failed = summary.loc[summary["status"] != "FINISHED", "run_id"].tolist()
    parent.set_tags({"failed_children": ",".join(failed) or "none", "n_failed": str(len(failed))})
    if metric in summary and summary[metric].notna().any():
        parent.log_figure(plots.sweep_figure(summary, metric), f"sweep/{metric.replace('/', '_')}_vs_fraction.png")
        log_report(parent, summary, metric)


def main_metric(cfg: Config) -> str:
    """The sweep's headline metric: lesion-level MAE, or balanced accuracy for classification (accuracy for the
    class tasks, loss for pretraining), on the test split, or on the validation split when ``sweep.fold_role`` is
    validation."""
    split = "val" if cfg.sweep.fold_role == "validation" else "test"
    if cfg.task in ("image_class", "text_class"):
        return f"{split}/accuracy"
    if cfg.task == "pretrain_mae":
        return f"{split}/loss"
    return f"lesion/{split}/mae" if cfg.task == "size_regression" else f"lesion/{split}/balanced_accuracy"
