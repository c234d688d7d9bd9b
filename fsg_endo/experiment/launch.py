"""``fsg-endo run``: config -> tracking check -> one run or a sweep -> results table; ``--resume`` finds the run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fsg_endo.engine.interrupt import RunInterrupted, StopSignals
from fsg_endo.engine.schema import CLASS_TASKS, Config
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import load_config, load_config_file

if TYPE_CHECKING:
    import pandas as pd

    from fsg_endo.engine.distributed import DistContext

# The config is checked before torch, MONAI and MLflow are imported (about 9 s here): a bad --set, experiment or
# data root is reported in about a second. Those imports sit in the functions that run once the config is valid.

REPORT_METRICS = {
    "size_regression": ["mae", "rmse", "within_1mm", "cls3_balanced_accuracy", "cls2_balanced_accuracy"],
    "size_class3": ["accuracy", "balanced_accuracy", "macro_f1"],
    "size_class2": ["accuracy", "balanced_accuracy", "macro_f1", "auroc"],
    "image_class": ["accuracy", "balanced_accuracy", "macro_f1"],
    "text_class": ["accuracy", "balanced_accuracy", "macro_f1"],
    "pretrain_mae": ["loss"],
}


def results_table(
    results: Mapping[str, float], metrics: list[str], baseline: Mapping[str, float] | None = None
) -> pd.DataFrame:
    """Rows: metrics; columns: frame/lesion x val/test, and the appearance baseline's lesion/test if given."""
    import pandas as pd

    cols = {
        f"{level}/{split}": f"{prefix}{split}/"
        for level, prefix in (("frame", ""), ("lesion", "lesion/"))
        for split in ("val", "test")
    }
    table = pd.DataFrame(
        {col: [results.get(p + m, float("nan")) for m in metrics] for col, p in cols.items()}, index=metrics
    )
    if baseline is not None:
        table["appearance baseline lesion/test"] = [baseline.get(f"lesion/test/{m}", float("nan")) for m in metrics]
    return table.dropna(axis=1, how="all")  # image_class and text_class have no lesion level


def gate_movement_line(results: Mapping[str, float]) -> str:
    """How far the best model's gates moved from init, against the spread of the init logits."""
    shift, spread = results["gates/all/shift"], results["gates/init/std"]
    return (
        f"gates: moved mean |g - g_init| = {shift:.4f} (max {results['gates/all/shift_max']:.4f}) in logits, "
        f"{shift / spread:.2f}x the init spread (std {spread:.4f})"
    )


def ui_hint(uri: str, experiment_id: str) -> str:
    """How to open the experiment's training runs: MLflow 3's UI otherwise lands in its GenAI traces view."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if uri.startswith("http"):
        return f"open {uri.rstrip('/')}/{page} in a browser"
    if uri.startswith("sqlite:///"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open http://127.0.0.1:5000/{page}"


def find_run(uri: str, exp_name: str, run_id: str):
    """The run to resume: an id, or ``last`` for the latest top-level run of the experiment."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    if run_id != "last":
        try:
            return client.get_run(run_id)
        except Exception:
            raise FsgEndoError(f"{uri}: no run with id {run_id}") from None
    exp = client.get_experiment_by_name(exp_name)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            "tags.`mlflow.parentRunId` IS NULL",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if exp
        else []
    )
    if not runs:
        raise FsgEndoError(f"{uri}: experiment {exp_name} has no run to resume")
    return runs[0]


class ResumeTarget(NamedTuple):
    run_id: str
    cfg: Config
    run_dir: Path


def resume_target(uri: str, exp_name: str, run_id: str) -> ResumeTarget:
    """The run, config and checkpoint folder of ``--resume RUN_ID|last``."""
    run = find_run(uri, exp_name, run_id)
    if run.info.status == "FINISHED":
        raise FsgEndoError(f"run {run.info.run_id} is already FINISHED: nothing to resume")
    ckpt_dir = run.data.tags.get("checkpoint_dir")
    if not ckpt_dir or not (Path(ckpt_dir) / "config.yaml").exists():
        raise FsgEndoError(f"run {run.info.run_id}: no checkpoint folder to resume from ({ckpt_dir})")
    return ResumeTarget(run.info.run_id, load_config_file(Path(ckpt_dir) / "config.yaml"), Path(ckpt_dir))


def _overrides(args: argparse.Namespace, task: str) -> list[str]:
    """``--data-root`` and ``--manifest`` as overrides; a polyp root also sets its source (SUN or REAL-Colon)."""
    from fsg_endo.data.manifest import detect_format

    overrides: list[str] = []
    if args.data_root:
        root = Path(args.data_root)
        if task == "pretrain_mae":
            overrides.append("data.source=frames")  # a folder of unlabelled frames
        elif task not in CLASS_TASKS:
            overrides.append(f"data.source={detect_format(root)}")
        overrides.append(f"data.root={root}")
    if args.manifest:
        overrides.append(f"data.manifest={args.manifest}")
    return overrides + list(args.overrides)


def run_from_args(args: argparse.Namespace) -> int:
    """Entry of ``experiments/run.py`` and ``fsg-endo run`` (also one process of a torchrun job).

    Exit code 0, or 128 + the signal number (130, 143) when SIGINT/SIGTERM stopped the run after a checkpoint.
    """
    cfg = load_config(args.exp, args.overrides, profile=args.profile, smoke=args.smoke)
    if args.data_root or args.manifest:  # before the user's --set, which wins
        cfg = load_config(args.exp, _overrides(args, cfg.task), profile=args.profile, smoke=args.smoke)
    from fsg_endo.data.text import check_text_source
    from fsg_endo.engine.class_data import check_image_root
    from fsg_endo.engine.distributed import init_distributed, shutdown
    from fsg_endo.engine.recipe import check_eval_metric
    from fsg_endo.tracking.tracker import check_tracking_uri, resolve_tracking_uri

    check_eval_metric(cfg)

    if cfg.task in CLASS_TASKS and not args.resume:  # before a run opens: no empty FAILED run
        check = check_image_root if cfg.task == "image_class" else check_text_source
        check(cfg.data.source, cfg.data.root)
    uri = resolve_tracking_uri(args.tracking_uri, cfg.tracking.uri)
    check_tracking_uri(uri)
    ctx = init_distributed(cfg.device)
    try:
        with StopSignals() as stop:
            _run(args, cfg, uri, ctx, stop)
    except RunInterrupted as err:
        if ctx.is_main:
            print(f"fsg-endo: run stopped: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        shutdown(ctx)
    return 0


def _pretrain(exp: str, profile: str | None, args: argparse.Namespace, uri: str, stop: StopSignals) -> None:
    """Run the pretraining experiment ``exp`` with ``profile`` (one process) into ``uri``, smoke if the run is."""
    from fsg_endo.engine.distributed import SINGLE

    cfg = load_config(exp, [], profile=profile, smoke=args.smoke)
    _run(argparse.Namespace(resume=None, ray_address=None), cfg, uri, SINGLE, stop)


def _run(args: argparse.Namespace, cfg: Config, uri: str, ctx: DistContext, stop: StopSignals) -> None:
    from fsg_endo.engine.backbones import fetch_backbones
    from fsg_endo.engine.baselines import baseline_metrics, baseline_of
    from fsg_endo.experiment.own_backbones import pretrain_missing
    from fsg_endo.experiment.runs import execute, open_run, run_dir_for, run_name, start_run
    from fsg_endo.experiment.sweep import child_configs, main_metric, run_sweep
    from fsg_endo.tracking.tracker import Tracker

    resume = None
    if args.resume:
        resume = ctx.broadcast(resume_target(uri, cfg.name, args.resume) if ctx.is_main else None)
        cfg = resume.cfg
    configs = list(child_configs(cfg)) if cfg.sweep.enabled else [cfg]
    ctx.main_first(
        lambda: pretrain_missing(configs, uri, lambda exp, profile: _pretrain(exp, profile, args, uri, stop))
    )
    ctx.main_first(lambda: fetch_backbones(configs, uri))  # before a run opens: missing weights write nothing
    if cfg.sweep.enabled:
        summary = run_sweep(
            cfg, uri, resume_run_id=resume.run_id if resume else None, ctx=ctx, stop=stop, ray_address=args.ray_address
        )
        if ctx.is_main:
            cols = [
                c
                for c in (
                    "regularizer",
                    "train_fraction",
                    "grid_point",
                    "fold",
                    "seed",
                    "status",
                    main_metric(cfg),
                    "gates/all/shift",
                    "gates/init/std",
                )
                if c in summary and (c != "grid_point" or cfg.sweep.grid or cfg.sweep.variants)
            ]
            print(summary[cols].to_string(index=False))
    else:
        tracker = open_run(
            ctx, lambda: Tracker.start(uri, cfg.name, resume_run_id=resume.run_id) if resume else start_run(cfg, uri)
        )
        run_dir = resume.run_dir if resume else run_dir_for(cfg, tracker.run_id)
        results = execute(cfg, tracker, run_dir, ctx, stop)
        if ctx.is_main:
            trained = not baseline_of(cfg.regularizer)
            # the same rows, so the model's lesion/test column and the baseline's compare directly
            polyps = trained and cfg.task not in (*CLASS_TASKS, "pretrain_mae")
            baseline = baseline_metrics(cfg, "appearance")[0] if polyps else None
            best = f"; best epoch {results['best_epoch']:.0f}; checkpoints in {run_dir}" if trained else ""
            print(f"\n{cfg.name} ({run_name(cfg)}), run {tracker.run_id}{best}")
            print(
                results_table(results, REPORT_METRICS[cfg.task], baseline).to_string(float_format=lambda v: f"{v:.3f}")
            )
            if "gates/all/shift" in results:
                print(gate_movement_line(results))
    if ctx.is_main:
        import mlflow

        experiment = mlflow.MlflowClient(uri).get_experiment_by_name(cfg.name)
        print(f"\nMLflow UI: {ui_hint(uri, experiment.experiment_id)}")
