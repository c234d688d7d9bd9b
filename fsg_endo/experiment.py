"""Run an experiment from the command line: config -> tracking check -> data -> training -> results table."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fsg_endo.config import dump_config, flatten_config, load_config, load_config_file
from fsg_endo.errors import FsgEndoError
from fsg_endo.tracking import Tracker, check_tracking_uri, git_commit, resolve_tracking_uri

REPORT_METRICS = {
    "size_regression": ["mae", "rmse", "within_1mm", "cls3_balanced_accuracy", "cls2_balanced_accuracy"],
    "size_class3": ["accuracy", "balanced_accuracy", "macro_f1"],
    "size_class2": ["accuracy", "balanced_accuracy", "macro_f1", "auroc"],
}


def run_name(cfg: Mapping[str, Any]) -> str:
    d = cfg["data"]
    return f"{cfg['regularizer']}-frac{d['train_fraction']:g}-fold{d['test_fold']}-seed{cfg['seed']}"


def run_dir_for(cfg: Mapping[str, Any], run_id: str) -> Path:
    """Checkpoints and the resolved config of a run: ``checkpoint.dir`` or ``runs/<run_id>``."""
    return Path(cfg["checkpoint"]["dir"] or "runs") / run_id


def start_run(cfg: Mapping[str, Any], uri: str, parent_run_id: str | None = None,
              extra_tags: Mapping[str, str] = ()) -> Tracker:
    tags = {"regularizer": cfg["regularizer"], "task": cfg["task"], "git_commit": git_commit(), **dict(extra_tags)}
    return Tracker.start(uri, cfg["name"], run_name=run_name(cfg), tags=tags, params=flatten_config(cfg),
                         parent_run_id=parent_run_id)


def execute(cfg: Mapping[str, Any], tracker: Tracker, resumed: bool = False) -> dict[str, float]:
    """Prepare data, train and test inside an open run; the run ends FINISHED, FAILED or KILLED."""
    from fsg_endo.data.prepare import prepare_data
    from fsg_endo.train import fit

    run_dir = run_dir_for(cfg, tracker.run_id)
    try:
        if not resumed:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
            tracker.log_file(run_dir / "config.yaml")
            tracker.set_tags({"checkpoint_dir": str(run_dir.resolve())})
        data = prepare_data(cfg)
        if not resumed:
            tracker.set_tags({"data.manifest_sha256": data.manifest_sha256})
            tracker.log_text(data.summary.to_csv(index=False), "data/split_summary.csv")
        results = fit(cfg, data, tracker, run_dir)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return results


def results_table(results: Mapping[str, float], metrics: list[str]) -> pd.DataFrame:
    """Rows: metrics; columns: frame/lesion x val/test."""
    cols = {f"{level}/{split}": f"{prefix}{split}/" for level, prefix in (("frame", ""), ("lesion", "lesion/"))
            for split in ("val", "test")}
    return pd.DataFrame({col: [results.get(p + m, float("nan")) for m in metrics] for col, p in cols.items()},
                        index=metrics)


def ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        return f"mlflow ui --backend-store-uri sqlite:///{path} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"


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
    runs = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` IS NULL",
                              order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    if not runs:
        raise FsgEndoError(f"{uri}: experiment {exp_name} has no run to resume")
    return runs[0]


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = []
    if args.data_root:
        root = Path(args.data_root)
        source = "sun" if (root / "annotation_txt").is_dir() else "realcolon"
        overrides += [f"data.source={source}", f"data.root={root}"]
    if args.manifest:
        overrides.append(f"data.manifest={args.manifest}")
    return overrides + list(args.overrides)


def run_from_args(args: argparse.Namespace) -> int:
    """Entry of ``experiments/run.py`` and ``fsg-endo run``."""
    cfg = load_config(args.exp, _overrides(args), profile=args.profile, smoke=args.smoke)
    uri = resolve_tracking_uri(args.tracking_uri, cfg["tracking"]["uri"])
    check_tracking_uri(uri)
    if args.resume:
        run = find_run(uri, cfg["name"], args.resume)
        ckpt_dir = run.data.tags.get("checkpoint_dir")
        if not ckpt_dir or not (Path(ckpt_dir) / "config.yaml").exists():
            raise FsgEndoError(f"run {run.info.run_id}: no checkpoint folder to resume from ({ckpt_dir})")
        cfg = load_config_file(Path(ckpt_dir) / "config.yaml")
    if cfg["sweep"]["enabled"]:
        from fsg_endo.sweep import main_test_metric, run_sweep

        summary = run_sweep(cfg, uri, resume_run_id=run.info.run_id if args.resume else None)
        cols = [c for c in ("regularizer", "train_fraction", "fold", "seed", "status", main_test_metric(cfg["task"]))
                if c in summary]
        print(summary[cols].to_string(index=False))
    else:
        if args.resume:
            tracker = Tracker.start(uri, cfg["name"], resume_run_id=run.info.run_id)
        else:
            tracker = start_run(cfg, uri)
        results = execute(cfg, tracker, resumed=bool(args.resume))
        print(f"\n{cfg['name']} ({run_name(cfg)}), run {tracker.run_id}; best epoch {results['best_epoch']:.0f}")
        print(results_table(results, REPORT_METRICS[cfg["task"]]).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\nMLflow UI: {ui_hint(uri)}")
    return 0
