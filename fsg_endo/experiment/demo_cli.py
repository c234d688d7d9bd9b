"""Command lines of the demos (``experiments/demos/*.py``): train with MLflow tracking, or infer from a checkpoint.

MNIST and Imagenette take their settings from :data:`fsg_endo.experiment.demo.DEMOS`; CIFAR-100 from
``fsg_endo/experiment/configs/cifar100_fsg.yaml`` (read with the config loader, so ``--set`` works as for
experiments). Expected errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import pandas as pd
import torch

from fsg_endo.tracking import plots
from fsg_endo.experiment.config import flatten_config, load_config
from fsg_endo.experiment.demo import (
    DEMOS,
    MAX_NAMED_CLASSES,
    SMOKE,
    DemoConfig,
    evaluate,
    load_demo,
    load_demo_data,
    save_demo,
    train_demo,
    with_weights_architecture,
)
from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import fold_gates
from fsg_endo.engine.metrics import confusion_matrix
from fsg_endo.tracking.tracker import Tracker, check_tracking_uri, git_commit, resolve_tracking_uri

CIFAR_EXPERIMENT = "cifar100_fsg"
DEMO_NAMES = {"mnist": "MNIST", "imagenette": "Imagenette", "cifar100": "CIFAR-100"}
CHECKPOINTS = {"cifar100": "checkpoints/fsg_vit_cifar100_demo.pth"}
CIFAR_KEYS = {"data_root": "data.root", "epochs": "optim.epochs", "weights": "model.weights", "seed": "seed",
              "batch_size": "optim.batch_size", "tracking_uri": "tracking.uri"}  # flags as config keys


def config_from_experiment(cfg: Mapping[str, Any], checkpoint: str) -> DemoConfig:
    """A resolved experiment config (``cifar100_fsg.yaml``) as the demo's config."""
    if cfg["regularizer"] != "fsg_gr" or cfg["task"] != "image_class":
        raise FsgEndoError(f"{cfg['name']}: the demo trains task image_class with regularizer fsg_gr, "
                           f"got task {cfg['task']} and regularizer {cfg['regularizer']}")
    data, model, optim = cfg["data"], cfg["model"], cfg["optim"]
    return DemoConfig(
        name=cfg["name"], dataset=data["source"], data_root=data["root"], checkpoint=checkpoint,
        image_size=data["image_size"], patch_size=model["patch_size"], preset=model["preset"],
        hidden_dim=model["hidden_dim"], depth=model["depth"], heads=model["heads"], mlp_dim=model["mlp_dim"],
        epochs=optim["epochs"], batch_size=optim["batch_size"], lr=optim["lr"], weight_decay=optim["weight_decay"],
        gate_lr=cfg["gr"]["gate_lr"], clip=optim["clip"], gate_clip=cfg["gr"]["gate_clip"],
        warmup_share=optim["warmup_epochs"] / optim["epochs"], train_fraction=data["train_fraction"],
        eval_every=cfg["eval"]["every"],
        shift=4 if data["augment"] else 0, flip=data["augment"], seed=cfg["seed"], weights=model["weights"],
        tracking_uri=cfg["tracking"]["uri"], log_every=cfg["tracking"]["log_every"],
        gate_log_every=cfg["gates"]["log_every"], sparsity_threshold=cfg["gates"]["sparsity_threshold"],
        log_model=cfg["tracking"]["log_model"], plots=cfg["tracking"]["plots"])


def _training_config(dataset: str, args: argparse.Namespace) -> tuple[DemoConfig, dict[str, Any]]:
    """The demo config of the command line, and the experiment params to log besides it (CIFAR-100).

    For CIFAR-100 the flags become config overrides, so the logged experiment config agrees with them.
    """
    given = {"data_root": args.data_root, "epochs": args.epochs, "weights": args.weights, "seed": args.seed,
             "batch_size": args.batch_size, "train_limit": args.train_limit, "tracking_uri": args.tracking_uri}
    given = {k: v for k, v in given.items() if v is not None}
    checkpoint = args.checkpoint or CHECKPOINTS.get(dataset) or DEMOS[dataset].checkpoint
    if dataset != "cifar100":
        cfg = replace(DEMOS[dataset], checkpoint=checkpoint, **(SMOKE if args.smoke else {}))
        return replace(cfg, **given), {}
    flags = [f"{CIFAR_KEYS[k]}={v}" for k, v in given.items() if k in CIFAR_KEYS]
    smoke = ["tracking.log_model=false"] if args.smoke else []  # the config's smoke profile does the rest
    exp = load_config(CIFAR_EXPERIMENT, [*smoke, *flags, *args.overrides], smoke=args.smoke)
    cfg = config_from_experiment(exp, checkpoint)
    limits = {k: SMOKE[k] for k in ("train_limit", "test_limit")} if args.smoke else {}
    rest = {k: v for k, v in given.items() if k not in CIFAR_KEYS}
    return replace(cfg, **limits, **rest), flatten_config(exp)


def run_training(cfg: DemoConfig, extra_params: Mapping[str, Any] = (),
                 echo: Callable[[str], None] = print) -> dict[str, float]:
    """Load the data, train in a new MLflow run, save the checkpoint and log predictions, plots and model."""
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_uri(uri)
    cfg = with_weights_architecture(cfg)
    data = load_demo_data(cfg)  # before the run starts: missing data leaves no empty run behind
    if data.note:
        echo(data.note)
    echo(f"{DEMO_NAMES[cfg.dataset]} demo: {len(data.train)} training / {len(data.test)} held-out images "
         f"of {len(data.class_names)} classes (source: {data.source}), {cfg.epochs} epochs, FSG + GR")
    fallback = "sklearn_digits" if data.source == "sklearn_digits" else "none"
    tags = {"regularizer": "fsg_gr", "task": "image_class", "git_commit": git_commit(), "demo": cfg.dataset,
            "data.source": data.source, "data.fallback": fallback, "fine_tuned_from": cfg.weights or "scratch"}
    params = {**dict(extra_params), **asdict(cfg), "data.source_read": data.source, "data.n_train": len(data.train),
              "data.n_test": len(data.test), "fsg.enabled": True, "gr.enabled": True}
    tracker = Tracker.start(uri, cfg.name, run_name=f"{cfg.dataset}-{data.source}-seed{cfg.seed}", tags=tags,
                            params=params)
    try:
        model, state = train_demo(cfg, data, tracker, on_epoch=lambda row: echo(_epoch_line(row, cfg.epochs)))
        path = save_demo(cfg.checkpoint, model, cfg, data, state)
        tracker.log_metrics({f"test/{k}": v for k, v in state["test_metrics"].items()}, state["steps"])
        tracker.log_text(state["predictions"].to_csv(index=False), "predictions/test.csv")
        tracker.log_file(path, "checkpoint")
        if cfg.plots:
            history = pd.DataFrame(state["history"])
            tracker.log_figure(plots.learning_curves(history, "test/accuracy"), "plots/learning_curves.png")
            if len(data.class_names) <= MAX_NAMED_CLASSES:
                table = state["predictions"]
                matrix = confusion_matrix(table["target"], table["prediction"], len(data.class_names))
                tracker.log_figure(plots.confusion_figure(matrix, data.class_names, "held-out"),
                                   "plots/confusion_test.png")
        if cfg.log_model:
            tracker.log_model(fold_gates(model).eval())
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    accuracy = state["test_metrics"]["accuracy"]
    echo(f"held-out accuracy {accuracy:.4f}; checkpoint {path}; MLflow run {tracker.run_id} "
         f"(experiment {cfg.name}, {uri})")
    return state["test_metrics"]


def _epoch_line(row: Mapping[str, float], epochs: int) -> str:
    held_out = f"  held-out accuracy {row['test/accuracy']:.4f}" if "test/accuracy" in row else ""
    return (f"epoch {row['epoch']:>2}/{epochs}  loss {row['train/epoch_loss']:.4f}  gate loss "
            f"{row['train/epoch_gate_loss']:.4f}{held_out}  ({row['perf/epoch_seconds']:.1f} s training)")


def run_inference(checkpoint: str, data_root: str | None = None, show: int = 8, smoke: bool = False,
                  echo: Callable[[str], None] = print) -> float:
    """Load a demo checkpoint (``weights_only``), print a few per-image predictions and the held-out accuracy."""
    model, cfg, ckpt = load_demo(checkpoint)
    cfg = replace(cfg, **({"data_root": data_root} if data_root else {}),
                  **({"test_limit": SMOKE["test_limit"]} if smoke else {}))
    data = load_demo_data(cfg, train=False)
    if data.note:
        echo(data.note)
    names = tuple(ckpt["class_names"])
    if data.class_names != names:
        raise FsgEndoError(f"{cfg.data_root}: classes {list(data.class_names)[:5]}... differ from the "
                           f"checkpoint's {list(names)[:5]}...")
    if data.source != ckpt["source"]:
        echo(f"note: the checkpoint was trained on {ckpt['source']}, the held-out images come from {data.source}")
    _, table = evaluate(model, data.test, ckpt["mean"], ckpt["std"], names)
    echo(f"{checkpoint}: ViT with FSG trained by Gradient Routing on {ckpt['source']}, "
         f"{ckpt['epochs_trained']} epochs; gates folded into the weights for inference")
    columns = ["image_id", "target_name", "prediction_name", "confidence"]
    echo(table[columns].head(show).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    accuracy = float((table["target"] == table["prediction"]).mean())
    echo(f"held-out accuracy: {accuracy:.4f} ({int((table['target'] == table['prediction']).sum())}/{len(table)} "
         f"images, source {data.source})")
    return accuracy


def _run_arguments(parser: argparse.ArgumentParser, dataset: str) -> None:
    default_root = load_config(CIFAR_EXPERIMENT)["data"]["root"] if dataset == "cifar100" else DEMOS[dataset].data_root
    parser.add_argument("--data-root", default=None, help=f"dataset root (default {default_root})")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a handful of images (for tests)")
    parser.add_argument("--checkpoint", default=None, help="where to save the trained model")
    parser.add_argument("--weights", default=None,
                        help="fine-tune from a local torchvision vit_b_16 state dict or timm ViT checkpoint")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--train-limit", type=int, default=None, help="use at most this many training images")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (MLFLOW_TRACKING_URI wins)")
    _threads_argument(parser)
    if dataset == "cifar100":
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help=f"override a key of fsg_endo/experiment/configs/{CIFAR_EXPERIMENT}.yaml (repeatable)")


def _threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per operation (default 1: these small ViTs gain little from more, and a "
                             "busy machine makes extra threads wait on each other; 0 = PyTorch's default)")


def _set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def _guarded(prog: str, fn: Callable[[], Any]) -> int:
    """Run ``fn``; an expected error is one line on stderr and exit code 2."""
    try:
        fn()
    except FsgEndoError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def training_main(dataset: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``demo_training_<dataset>.py``: train a ViT with FSG + GR and save the checkpoint."""
    prog = prog or f"demo_training_{dataset}"
    parser = argparse.ArgumentParser(prog=prog, description=f"Train a ViT with FSG + Gradient Routing on "
                                                            f"{DEMO_NAMES[dataset]} (nothing is downloaded).")
    _run_arguments(parser, dataset)
    args = parser.parse_args(argv)

    def train() -> None:
        _set_threads(args.threads)
        cfg, extra = _training_config(dataset, args)
        run_training(cfg, {**extra, "threads": torch.get_num_threads()})

    return _guarded(prog, train)


def inference_main(dataset: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``demo_inference_<dataset>.py``: predictions of a trained demo checkpoint on the held-out split."""
    prog = prog or f"demo_inference_{dataset}"
    parser = argparse.ArgumentParser(prog=prog, description=f"Held-out predictions of the {DEMO_NAMES[dataset]} "
                                                            f"demo checkpoint.")
    default = CHECKPOINTS.get(dataset) or DEMOS[dataset].checkpoint
    parser.add_argument("--checkpoint", default=default, help=f"trained demo checkpoint (default {default})")
    parser.add_argument("--data-root", default=None, help="dataset root (default: the one used for training)")
    parser.add_argument("--show", type=int, default=8, help="number of per-image predictions to print")
    parser.add_argument("--smoke", action="store_true", help="a handful of held-out images (for tests)")
    _threads_argument(parser)
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    return _guarded(prog, lambda: run_inference(args.checkpoint, args.data_root, args.show, args.smoke))
