"""One MLflow run's lifecycle: start or reopen it, record its config, execute data + training inside it, end it."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsg_endo.engine.backbones import backbone_params
from fsg_endo.engine.distributed import SINGLE, DistContext
from fsg_endo.engine.evaluation import lesion_counts
from fsg_endo.engine.interrupt import StopSignals
from fsg_endo.engine.recipe import accumulates_gate_pass, uses_gates, uses_routing
from fsg_endo.engine.schema import Config
from fsg_endo.experiment.config import dump_config, flatten_config
from fsg_endo.io import atomic_path
from fsg_endo.tracking.tracker import GRID_POINT_TAG, NullTracker, Tracker, TrackingError, git_commit, source_tags


def grid_point(cfg: Config) -> str:
    """The config's variant and values of the ``sweep.grid`` keys, ``"variant=relw,gr.gate_lr=0.01"`` ("" without
    either)."""

    def value(key: str) -> Any:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        return f"{node:g}" if isinstance(node, float) else node

    variant = [f"variant={cfg.sweep.variant}"] if cfg.sweep.variant else []
    return ",".join(variant + [f"{key}={value(key)}" for key in cfg.sweep.grid])


def swept_fold(cfg: Config) -> int:
    """The fold a sweep varies: the test fold, or the validation fold when ``sweep.fold_role`` is validation."""
    return cfg.data.val_fold if cfg.sweep.fold_role == "validation" else cfg.data.test_fold


if TYPE_CHECKING:
    from fsg_endo.engine.bundle import DataBundle


def run_name(cfg: Config) -> str:
    """``fsg_gr-frac0.5-fold0-seed0`` (``val2`` for validation fold 2 when ``sweep.fold_role`` is validation), then
    the grid point if the sweep has variants or a grid (also a sweep child's key)."""
    point, fold = grid_point(cfg), "val" if cfg.sweep.fold_role == "validation" else "fold"
    name = f"{cfg.regularizer}-frac{cfg.data.train_fraction:g}-{fold}{swept_fold(cfg)}-seed{cfg.seed}"
    return f"{name}-{point}" if point else name


def run_dir_for(cfg: Config, run_id: str) -> Path:
    """Checkpoints and the resolved config of a run: ``checkpoint.dir`` or ``runs/<run_id>``."""
    return Path(cfg.checkpoint.dir or "runs") / run_id


def run_params(cfg: Config) -> dict[str, Any]:
    """The MLflow params of a run: the flattened config plus the facts that follow from ``regularizer``."""
    reg = cfg.regularizer
    return flatten_config(cfg) | {
        "fsg.enabled": uses_gates(reg),
        "gr.enabled": uses_routing(reg),
        "gr.accumulate_gate_pass_grads": accumulates_gate_pass(cfg),
    }


def start_run(cfg: Config, uri: str, parent_run_id: str | None = None, extra_tags: Mapping[str, str] = ()) -> Tracker:
    tags = {
        "regularizer": cfg.regularizer,
        "task": cfg.task,
        "git_commit": git_commit(),
        **source_tags(sys.argv[0] or "fsg-endo"),
        **dict(extra_tags),
    }
    if grid_point(cfg):
        tags[GRID_POINT_TAG] = grid_point(cfg)
    return Tracker.start(
        uri,
        cfg.name,
        run_name=run_name(cfg),
        tags=tags,
        params=run_params(cfg) | backbone_params(cfg),
        parent_run_id=parent_run_id,
    )


def open_run(ctx: DistContext, opener: Callable[[], Tracker]) -> Tracker | NullTracker:
    """Rank 0 opens (or reopens) the MLflow run; the other ranks of a torchrun job get its id only."""
    tracker = opener() if ctx.is_main else None
    run_id = ctx.broadcast(tracker.run_id if tracker else None)
    return tracker or NullTracker(run_id)


def record_config(cfg: Config, tracker: Tracker, run_dir: Path) -> None:
    """The resolved config in the run's folder and as an artifact; the folder as tag (what a resume reads)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    tracker.log_file(run_dir / "config.yaml")
    tracker.set_tags({"checkpoint_dir": str(run_dir.resolve())})


def record_data(data: DataBundle, tracker: Tracker, run_dir: Path) -> None:
    """What the run read: tags (a content hash, fallbacks), the split summary, and the data's JSON files (the class
    tasks' ``data.json``: classes and normalisation, what inference needs); a note, e.g. a fallback, is printed."""
    if data.note:
        print(f"note: {data.note}")
    tracker.set_tags({**data.tags, **({"data.note": data.note} if data.note else {})})
    tracker.log_text(data.summary.to_csv(index=False), "data/split_summary.csv")
    for name, content in data.files.items():
        with atomic_path(run_dir / name) as tmp:
            tmp.write_text(json.dumps(content, indent=1), encoding="utf-8")
        tracker.log_file(run_dir / name)


def record_inputs(cfg: Config, data: DataBundle, tracker: Tracker) -> None:
    """Each split as an MLflow dataset input (contexts train/val/test, source the manifest); system metrics
    from here on when ``tracking.system_metrics`` is set."""
    for context, rows in data.splits.items():
        tracker.log_dataset(rows, source=str(data.source.resolve()), name=data.source_name, context=context)
    if cfg.tracking.system_metrics:
        tracker.monitor_system()


def end_run(tracker: Tracker | NullTracker, status: str) -> None:
    """Mark the run ``status`` on the way out of an error; an unreachable store must not hide that error."""
    with contextlib.suppress(TrackingError):
        tracker.end(status)


def execute(
    cfg: Config,
    tracker: Tracker | NullTracker,
    run_dir: Path,
    ctx: DistContext = SINGLE,
    stop: StopSignals | None = None,
) -> dict[str, float]:
    """Prepare data, train (resuming from ``run_dir``'s checkpoint if any) and test inside an open run;
    the run ends FINISHED, FAILED or KILLED. A baseline arm fits its scikit-learn model instead (rank 0)."""
    from fsg_endo.engine.baselines import baseline_of, fit_baseline
    from fsg_endo.engine.prepare import prepare_data
    from fsg_endo.engine.train import fit

    try:
        if ctx.is_main:
            record_config(cfg, tracker, run_dir)
        if baseline_of(cfg.regularizer):
            results = fit_baseline(cfg, tracker) if ctx.is_main else {}
        else:
            data = ctx.main_first(lambda: prepare_data(cfg, ctx.world_size, ctx.rank))
            sizes = lesion_counts(data.splits)
            if ctx.is_main:
                record_data(data, tracker, run_dir)
                tracker.log_metrics(sizes, 0)
                record_inputs(cfg, data, tracker)
            results = fit(cfg, data, tracker, run_dir, ctx, stop) | sizes
    except KeyboardInterrupt:
        end_run(tracker, "KILLED")
        raise
    except TrackingError as err:
        end_run(tracker, "FAILED")  # after an outage the store cannot be told: the run stays RUNNING
        raise TrackingError(
            f"{err}; the run's checkpoints are in {run_dir.resolve()}: "
            f"resume with --resume {tracker.run_id} once the store is back"
        ) from err
    except BaseException:
        end_run(tracker, "FAILED")
        raise
    tracker.end("FINISHED")
    return results
