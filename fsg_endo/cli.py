"""The ``fsg-endo`` command: ``run``, ``synth``, ``manifest``, ``compare``, ``report``, ``evaluate``, ``predict``.

Each subcommand parses its arguments here and calls one function of the package. Expected user
errors (:class:`FsgEndoError`) become one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from fsg_endo.errors import FsgEndoError


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fsg-endo run``, shared with ``experiments/run.py``."""
    p.add_argument(
        "--exp", required=True, help="experiment name (a YAML shipped in fsg_endo/experiment/configs/) or a YAML path"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.epochs=3 (repeatable)",
    )
    p.add_argument("--profile", default=None, help="apply a named profile of the config, e.g. 'paper'")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny data (for tests)")
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset root: REAL-Colon or SUN layout, or the images of an image_class experiment (data.root)",
    )
    p.add_argument("--manifest", default=None, help="manifest CSV to train from")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="resume an MLflow run ('last' for the latest)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (MLFLOW_TRACKING_URI wins)")
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="sweeps: join this Ray cluster (default: RAY_ADDRESS, else a local Ray instance)",
    )


def _run(args: argparse.Namespace) -> int:
    from fsg_endo.experiment.launch import run_from_args

    return run_from_args(args)


def _synth(args: argparse.Namespace) -> int:
    from fsg_endo.synth.dataset import generate_dataset

    out = generate_dataset(args.out, n_videos=args.videos, seed=args.seed)
    print(f"synthetic dataset written to {out}")
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from fsg_endo.data.manifest import build_manifest, write_manifest

    df = build_manifest(
        args.format, args.root, folds=args.folds, seed=args.seed, sizes=args.sizes, check_images=args.check_images
    )
    write_manifest(df, args.out)
    print(f"{len(df)} rows, {df['lesion_id'].nunique()} lesions, {df['video_id'].nunique()} videos -> {args.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fsg_endo.experiment.compare import compare_table

    print(compare_table(args.exp, tracking_uri=args.tracking_uri, metric=args.metric).to_string())
    return 0


def _report(args: argparse.Namespace) -> int:
    from fsg_endo.experiment.report import report_table

    table = report_table(
        args.exp,
        tracking_uri=args.tracking_uri,
        metric=args.metric,
        reference=args.reference,
        parent_run_id=args.parent,
        axis=args.axis,
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fsg_endo.experiment.evaluate import evaluate_model

    result = evaluate_model(
        args.model,
        args.data_root,
        fmt=args.format,
        sizes=args.sizes,
        manifest=args.manifest,
        fold=args.fold,
        tracking_uri=args.tracking_uri,
    )
    print(
        f"{args.model} on {args.data_root}: {result.rows} boxes of {result.lesions} lesions; MLflow run {result.run_id}"
    )
    print(result.table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fsg_endo.experiment.predict import predict_sizes

    result = predict_sizes(
        args.model, args.boxes, args.out, video=args.video, frames=args.frames, tracking_uri=args.tracking_uri
    )
    if result.lesions is not None:
        print(result.lesions.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"{len(result.boxes)} boxes sized -> {', '.join(map(str, result.written))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsg-endo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run an experiment (same as experiments/run.py)")
    add_run_arguments(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("synth", help="write a synthetic colonoscopy dataset in the REAL-Colon layout")
    p.add_argument("--out", required=True)
    p.add_argument("--videos", type=int, default=None, help="number of videos (default: the standard dataset)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    p = sub.add_parser("manifest", help="build a manifest CSV from a dataset root")
    p.add_argument("--format", required=True, choices=["realcolon", "sun", "synthetic"])
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default=None, help="SUN only: CSV with columns case,size_mm")
    p.add_argument("--check-images", action="store_true", help="decode every frame and report unreadable ones")
    p.set_defaults(func=_manifest)

    p = sub.add_parser("compare", help="table of an experiment's runs by regularizer and train fraction")
    p.add_argument("--exp", required=True)
    p.add_argument("--metric", default=None, help="metric to tabulate (default: the task's main test metric)")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_compare)

    p = sub.add_parser("report", help="paired statistics of a sweep's arms against reference arms, per train fraction")
    p.add_argument("--exp", required=True)
    p.add_argument("--metric", default=None, help="metric to test (default: the task's main test metric)")
    p.add_argument(
        "--reference",
        default=None,
        help="compare against this arm only (default: fsg_gr and none); with --axis, this value of the axis",
    )
    p.add_argument(
        "--axis",
        default=None,
        metavar="KEY",
        help="compare the values of this sweep.grid key for the same arm (e.g. model.weights: pretrained vs scratch)",
    )
    p.add_argument(
        "--parent",
        action="append",
        metavar="RUN_ID",
        help="the sweep's parent run (default: the latest); repeat it to report several sweeps' children together",
    )
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_report)

    model_help = "runs:/<run id>/model, models:/<name>/<version> or a local model folder"
    p = sub.add_parser("evaluate", help="test a logged model on a dataset (or one fold); logs a new run")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--data-root", required=True, help="dataset root (REAL-Colon, SUN or synthetic layout)")
    p.add_argument(
        "--format",
        default=None,
        choices=["realcolon", "sun", "synthetic"],
        help="layout of the root (default: sun if it has annotation_txt/, else realcolon)",
    )
    p.add_argument("--sizes", default=None, help="SUN only: CSV with columns case,size_mm")
    p.add_argument("--manifest", default=None, help="manifest CSV of the root (default: read the root)")
    p.add_argument("--fold", type=int, default=None, help="test on this fold only (folds made as in training)")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="size the polyps boxed in a new video or frames folder")
    p.add_argument("--model", required=True, help=model_help)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", default=None, help="video file; boxes name frames by frame_index (from 0)")
    source.add_argument("--frames", default=None, help="frames folder; boxes name frames by frame_path")
    p.add_argument("--boxes", required=True, help="CSV: frame_index or frame_path, xmin, ymin, xmax, ymax[, lesion_id]")
    p.add_argument("--out", required=True, help="output CSV (one row per box; <out>_lesions.csv with lesion ids)")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_predict)
    return parser


def one_line(err: FsgEndoError) -> str:
    """The error's own message, also when a DataLoader worker re-raised it with the worker's traceback."""
    last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return last.split("FsgEndoError: ", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FsgEndoError as err:
        print(f"fsg-endo: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsg-endo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
