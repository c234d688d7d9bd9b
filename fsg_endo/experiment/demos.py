"""The classification demos (MNIST, Imagenette, CIFAR-100, a text CSV): their command lines, over the experiment runner.

Training is ``fsg-endo run --exp <demo>`` with the demo's flags turned into config overrides, so a demo run is
an MLflow run like any experiment (the engine's loop, checkpoints, resume, guards). Inference reads the run's
folder: its resolved ``config.yaml``, ``data.json`` (classes, normalisation) and the best model ``best.pt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from fsg_endo.data.image_folders import image_dataset
from fsg_endo.data.pipeline import make_loader
from fsg_endo.engine.bundle import split_seed
from fsg_endo.engine.checkpoint import load_checkpoint
from fsg_endo.engine.class_data import read_images
from fsg_endo.engine.evaluation import predict
from fsg_endo.engine.recipe import build_for, uses_gates
from fsg_endo.engine.schema import Config
from fsg_endo.engine.tasks import get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import load_config, load_config_file, set_in
from fsg_endo.experiment.launch import run_from_args
from fsg_endo.nn.gates import fold_gates
from fsg_endo.nn.models import vit_shape

DEMOS = {
    "mnist": ("demo_mnist", "MNIST"),
    "imagenette": ("demo_imagenette", "Imagenette"),
    "cifar100": ("cifar100_fsg", "CIFAR-100"),
    "text": ("text_fsg", "your text CSV"),
}  # dataset -> (experiment config, display name)
FINETUNE_LR = 5e-5  # the paper's backbone learning rate when fine-tuning from --weights
RUNS_DIR = "runs"  # the engine's run folders when checkpoint.dir is unset
SMOKE_TEST_IMAGES = 24  # inference --smoke: held-out images read


def weight_overrides(path: str, image_size: int) -> list[str]:
    """Overrides that fine-tune from a local ViT file: its shape, an image size its patches tile, the small rate."""
    shape = vit_shape(path)
    patch = shape["patch_size"]
    return [
        f"model.weights={path}",
        *(f"model.{k}={v}" for k, v in shape.items()),
        f"data.image_size={-(-image_size // patch) * patch}",
        f"optim.lr={FINETUNE_LR}",
    ]


def training_overrides(exp: str, args: argparse.Namespace) -> list[str]:
    """The demo flags as ``--set`` overrides (the demo's own ``--set`` last, so it wins)."""
    base = load_config(exp, smoke=args.smoke)
    flags = {
        "data.root": args.data_root,
        "optim.epochs": args.epochs,
        "checkpoint.dir": args.checkpoint,
        "seed": args.seed,
        "optim.batch_size": args.batch_size,
        "data.train_limit": args.train_limit,
    }
    out = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.epochs is not None and base.optim.warmup_epochs > args.epochs:
        out.append(f"optim.warmup_epochs={args.epochs}")
    if args.weights and base.task == "text_class":
        out.append(f"model.hf_model={args.weights}")
    elif args.weights:
        out += weight_overrides(args.weights, base.data.image_size)
    if args.smoke:
        out.append("tracking.log_model=false")
    return out + list(args.overrides)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="a handful of images (for tests)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per operation (default 1: these small ViTs gain little from more, and a "
        "busy machine makes extra threads wait on each other; 0 = PyTorch's default)",
    )


def _guarded(prog: str, threads: int, fn: Callable[[], int | None]) -> int:
    """Run ``fn`` with ``threads`` CPU threads; an expected error is one line on stderr and exit code 2."""
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return fn() or 0
    except FsgEndoError as err:
        print(f"{prog}: error: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def training_main(dataset: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``demo_training_<dataset>.py``: train a ViT (a transformers classifier for text) with FSG + GR through the
    experiment runner."""
    exp, title = DEMOS[dataset]
    prog = prog or f"demo_training_{dataset}"
    text = dataset == "text"
    model, fetched = (
        ("a transformers classifier", "a hub model is downloaded once, a local folder not")
        if text
        else ("a ViT", "nothing is downloaded")
    )
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Train {model} with FSG + Gradient Routing on {title} (experiment {exp}; {fetched})."
    )
    parser.add_argument("--data-root", default=None, help="dataset root (default: data.root of the config)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help=f"folder of the run folders (checkpoint.dir; default {RUNS_DIR}/)",
    )
    weights = (
        "the transformers model to fine-tune: a hub name or a local folder (model.hf_model)"
        if text
        else "fine-tune from a local torchvision vit_b_16 state dict or timm ViT checkpoint"
    )
    parser.add_argument("--weights", default=None, help=weights)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--train-limit", type=int, default=None, help=f"read at most this many training {'texts' if text else 'images'}"
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (MLFLOW_TRACKING_URI wins)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a key of fsg_endo/experiment/configs/{exp}.yaml (repeatable)",
    )
    _common_arguments(parser)
    args = parser.parse_args(argv)

    def train() -> int:
        run = argparse.Namespace(
            exp=exp,
            overrides=training_overrides(exp, args),
            profile=None,
            smoke=args.smoke,
            data_root=None,
            manifest=None,
            resume=None,
            tracking_uri=args.tracking_uri,
        )
        return run_from_args(run)

    return _guarded(prog, args.threads, train)


def _experiment_of(run_dir: Path) -> str | None:
    config = run_dir / "config.yaml"
    return yaml.safe_load(config.read_text(encoding="utf-8")).get("name") if config.is_file() else None


def find_model(path: str | Path, exp: str) -> tuple[Path, Path]:
    """(run folder, model file) of ``--checkpoint``: a checkpoint file in a run folder, a run folder (its
    ``best.pt``), or a folder of run folders (the newest best model of experiment ``exp``)."""
    path = Path(path)
    if path.is_file():
        return path.parent, path
    if (path / "config.yaml").is_file():
        return path, path / "best.pt"
    found = [p for p in path.glob("*/best.pt") if _experiment_of(p.parent) == exp] if path.is_dir() else []
    if not found:
        raise FsgEndoError(f"{path}: no trained {exp} run (train first, or pass --checkpoint RUN_FOLDER)")
    best = max(found, key=lambda p: p.stat().st_mtime)
    return best.parent, best


def load_trained(run_dir: Path, model_file: Path) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """The run's model (gates folded, eval mode), its config and ``data.json``; weights read with weights_only."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "data.json").is_file():
        raise FsgEndoError(f"{run_dir}: not an image_class run folder (config.yaml and data.json expected)")
    if not model_file.is_file():
        raise FsgEndoError(f"{model_file}: no model file (the run was never validated)")
    cfg = set_in(load_config_file(run_dir / "config.yaml"), "model.weights", None)  # the checkpoint has them
    info = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    model = build_for(cfg, get_task(cfg.task, class_names=info["class_names"]))
    try:
        state = load_checkpoint(model_file)["model"]
    except Exception as err:  # torch.load raises many types for a foreign or truncated file
        raise FsgEndoError(
            f"{model_file}: not an fsg_endo checkpoint readable with weights_only=True ({type(err).__name__})"
        ) from None
    model.load_state_dict(state)
    model = fold_gates(model).eval() if uses_gates(cfg.regularizer) else model.eval()
    return model, cfg, info


def infer(exp: str, args: argparse.Namespace, echo: Callable[[str], None] = print) -> float:
    """Per-image predictions of a trained demo run on its held-out split, and the held-out accuracy."""
    run_dir, model_file = find_model(args.checkpoint, exp)
    model, cfg, info = load_trained(run_dir, model_file)
    data = cfg.data.model_copy(update={"root": args.data_root or cfg.data.root})
    if args.smoke:
        data = data.model_copy(update={"test_limit": min(data.test_limit or SMOKE_TEST_IMAGES, SMOKE_TEST_IMAGES)})
    images = read_images(data, split_seed(cfg), train=False)
    if images.note:
        echo(images.note)
    names = tuple(info["class_names"])
    if images.class_names != names:
        raise FsgEndoError(
            f"{data.root}: classes {list(images.class_names)[:5]}... differ from the run's {list(names)[:5]}..."
        )
    if images.source != info["source_read"]:
        echo(f"note: the run was trained on {info['source_read']}, the held-out images come from {images.source}")
    loader = make_loader(image_dataset(images.test, info["mean"], info["std"]), 256)
    task = get_task(cfg.task, class_names=names)
    table = predict(model, loader, task, torch.device("cpu"), use_box=False, desc="test")
    folded = "; gates folded into the weights for inference" if uses_gates(cfg.regularizer) else ""
    echo(f"{model_file}: ViT trained with {cfg.regularizer} on {info['source_read']}{folded}")
    columns = ["image_id", "target_name", "prediction_name", "confidence"]
    echo(table[columns].head(args.show).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    correct = int((table["target"] == table["prediction"]).sum())
    accuracy = correct / len(table)
    echo(f"held-out accuracy: {accuracy:.4f} ({correct}/{len(table)} images, source {images.source})")
    return accuracy


def inference_main(dataset: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``demo_inference_<dataset>.py``: held-out predictions of the newest (or a given) trained demo run."""
    exp, title = DEMOS[dataset]
    prog = prog or f"demo_inference_{dataset}"
    parser = argparse.ArgumentParser(prog=prog, description=f"Held-out predictions of a trained {title} demo run.")
    parser.add_argument(
        "--checkpoint",
        default=RUNS_DIR,
        help=f"a run folder, a checkpoint file in one (best.pt, last.pt), or a folder of run "
        f"folders: its newest {exp} run (default {RUNS_DIR}/)",
    )
    parser.add_argument("--data-root", default=None, help="dataset root (default: the one used for training)")
    parser.add_argument("--show", type=int, default=8, help="number of per-image predictions to print")
    _common_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> None:
        infer(exp, args)

    return _guarded(prog, args.threads, run)
