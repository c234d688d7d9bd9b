"""Image-classification demos of FSG + Gradient Routing (MNIST, Imagenette, CIFAR-100): train, save, infer.

A compact loop, because ``fsg_endo.engine.train.fit`` is built around the polyp data bundle (lesions, box
features): in-memory images, a gated torchvision ViT from :func:`build_model`, one
:class:`GradientRouter` step per batch, MLflow through :class:`Tracker`, and a checkpoint that
``torch.load(..., weights_only=True)`` reads back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsg_endo.data.image_folders import DemoData, ImageSet, load_cifar100, load_image_folder, load_mnist
from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import fold_gates, gate_parameters, gate_statistics, gate_values, non_gate_parameters
from fsg_endo.engine.metrics import classification_metrics
from fsg_endo.nn.models import read_state_dict, build_model, timm_to_torchvision
from fsg_endo.nn.routing import GradientRouter
from fsg_endo.engine.recipe import warmup_cosine

__all__ = ["DEMOS", "SMOKE", "DemoConfig", "build_demo_model", "evaluate", "load_demo", "load_demo_data",
           "predict_table", "train_demo", "with_weights_architecture"]

CHECKPOINT_FORMAT = 1
MAX_NAMED_CLASSES = 20  # per-class metrics and the confusion plot use class names up to this many classes
EPOCH_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # held-out metrics logged every epoch


@dataclass(frozen=True)
class DemoConfig:
    """Everything one demo run depends on (logged as MLflow params and stored in the checkpoint)."""

    name: str  # MLflow experiment name
    dataset: str  # mnist | imagenette | cifar100
    data_root: str | None
    checkpoint: str
    image_size: int = 32
    patch_size: int = 4
    preset: str = "micro"
    hidden_dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    gate_lr: float = 1e-3
    clip: float = 10.0
    gate_clip: float = 32.0
    warmup_share: float = 0.1  # share of the steps with a rising learning rate
    train_fraction: float = 1.0  # share of the training images kept (class-stratified) ...
    train_limit: int | None = None  # ... and at most this many
    test_limit: int | None = None
    eval_every: int = 1  # epochs between held-out evaluations (the last epoch is always evaluated)
    shift: int = 0  # augmentation: random translation up to this many pixels
    flip: bool = False  # augmentation: random horizontal flip
    seed: int = 0
    weights: str | None = None  # local torchvision / timm ViT checkpoint to fine-tune from ...
    finetune_lr: float = 5e-5  # ... with this backbone learning rate (the paper's) instead of ``lr``
    tracking_uri: str | None = None
    log_every: int = 10
    gate_log_every: int = 20
    sparsity_threshold: float = 0.1
    log_model: bool = True
    plots: bool = True


DEMOS: dict[str, DemoConfig] = {
    "mnist": DemoConfig(name="demo_mnist", dataset="mnist", data_root="data",
                        checkpoint="checkpoints/fsg_vit_mnist_demo.pth", image_size=28, patch_size=7,
                        hidden_dim=64, depth=4, heads=4, mlp_dim=128, epochs=20, batch_size=32, lr=3e-3,
                        train_limit=2000, test_limit=2000, eval_every=5, shift=2),
    "imagenette": DemoConfig(name="demo_imagenette", dataset="imagenette", data_root="data/imagenette2-160",
                             checkpoint="checkpoints/fsg_vit_imagenette_demo.pth", image_size=64, patch_size=8,
                             hidden_dim=128, depth=4, heads=4, mlp_dim=256, epochs=8, batch_size=64, lr=1e-3,
                             train_limit=1000, test_limit=500, eval_every=2, shift=4, flip=True),
}
# --smoke: a few steps on a handful of images (for tests)
SMOKE: dict[str, Any] = {"epochs": 1, "batch_size": 16, "train_limit": 48, "test_limit": 24, "hidden_dim": 32,
                         "depth": 2, "heads": 2, "mlp_dim": 64, "log_every": 1, "gate_log_every": 2,
                         "log_model": False}


def load_demo_data(cfg: DemoConfig, train: bool = True) -> DemoData:
    """The demo's dataset, reduced as configured (``train=False``: the held-out split only)."""
    common = dict(image_size=cfg.image_size, seed=cfg.seed, fraction=cfg.train_fraction,
                  train_limit=cfg.train_limit, test_limit=cfg.test_limit, train=train)
    if cfg.dataset == "mnist":
        return load_mnist(cfg.data_root, **common)
    if cfg.data_root is None:
        raise FsgEndoError(f"{cfg.dataset}: no data root given (--data-root)")
    if cfg.dataset == "imagenette":
        return load_image_folder(cfg.data_root, **common)
    if cfg.dataset == "cifar100":
        return load_cifar100(cfg.data_root, **common)
    raise FsgEndoError(f"unknown demo dataset {cfg.dataset!r} (mnist, imagenette, cifar100)")


def with_weights_architecture(cfg: DemoConfig) -> DemoConfig:
    """For ``cfg.weights``: the ViT shape of the weight file, and an image size that its patches tile.

    Heads are not stored in a checkpoint; standard ViTs use 64 channels per head (Ti 3, S 6, B 12, L 16).
    """
    if cfg.weights is None:
        return cfg
    state = read_state_dict(cfg.weights)
    if "cls_token" in state or "patch_embed.proj.weight" in state:
        state = timm_to_torchvision(state)
    if "conv_proj.weight" not in state or "class_token" not in state:
        raise FsgEndoError(f"{cfg.weights}: not a ViT checkpoint (no patch projection / class token)")
    hidden, patch = state["class_token"].shape[-1], state["conv_proj.weight"].shape[-1]
    blocks = {k.split(".")[2] for k in state if k.startswith("encoder.layers.")}
    mlp = state.get("encoder.layers.encoder_layer_0.mlp.0.weight")
    image_size = -(-cfg.image_size // patch) * patch
    return replace(cfg, hidden_dim=hidden, depth=len(blocks), heads=max(1, hidden // 64) if hidden % 64 == 0 else 1,
                   mlp_dim=mlp.shape[0] if mlp is not None else 4 * hidden, patch_size=patch, image_size=image_size)


def build_demo_model(cfg: DemoConfig, n_classes: int, weights: bool = True) -> nn.Module:
    """A torchvision ViT with FSG for ``n_classes`` (``weights``: load ``cfg.weights`` before gating)."""
    return build_model(cfg.preset, cfg.image_size, cfg.patch_size, n_classes, hidden_dim=cfg.hidden_dim,
                       depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, fsg=True,
                       weights=cfg.weights if weights else None)


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (of 0-1 pixel values) of uint8 (N, 3, S, S) images."""
    x = images.float().div_(255.0)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (images.float().div(255.0) - mean[:, None, None]) / std[:, None, None]


def augment(images: Tensor, shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random translation (edge-padded, up to ``shift`` pixels) and horizontal flip, per image."""
    n, _, size, _ = images.shape
    if shift > 0:
        padded = F.pad(images.float(), (shift,) * 4, mode="replicate")
        dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=generator))
        rows = (torch.arange(size) + dy[:, None])[:, None, :, None]
        cols = (torch.arange(size) + dx[:, None])[:, None, None, :]
        images = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    return images


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Index batches over ``n`` items: shuffled with ``generator``, in order without one."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


@torch.no_grad()
def predict_proba(model: nn.Module, split: ImageSet, mean: Tensor, std: Tensor, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (N, C) of ``model`` in eval mode over a split."""
    model.eval()
    probs = [torch.softmax(model(normalise(split.images[idx], mean, std)).float(), dim=1)
             for idx in batches(len(split), batch_size)]
    return torch.cat(probs).numpy()


def predict_table(split: ImageSet, prob: np.ndarray, class_names: tuple[str, ...]) -> pd.DataFrame:
    """One row per image: id, target, prediction (indices and names) and the predicted class's probability."""
    pred = prob.argmax(axis=1)
    target = split.labels.numpy()
    return pd.DataFrame({"image_id": split.ids, "target": target, "prediction": pred,
                         "target_name": [class_names[k] for k in target],
                         "prediction_name": [class_names[k] for k in pred], "confidence": prob.max(axis=1)})


def evaluate(model: nn.Module, split: ImageSet, mean: Tensor, std: Tensor,
             class_names: tuple[str, ...]) -> tuple[dict[str, float], pd.DataFrame]:
    """Classification metrics (SPEC §3 names) and the per-image prediction table of a split."""
    table = predict_table(split, predict_proba(model, split, mean, std), class_names)
    n = len(class_names)
    metrics = classification_metrics(table["target"], table["prediction"], n,
                                     names=class_names if n <= MAX_NAMED_CLASSES else None)
    return metrics, table


def _optimizers(cfg: DemoConfig, model: nn.Module, total_steps: int):
    """GR's two Adam optimisers over disjoint sets, each with the experiments' warmup + cosine schedule."""
    lr = cfg.finetune_lr if cfg.weights else cfg.lr
    main = torch.optim.Adam(non_gate_parameters(model), lr=lr, weight_decay=cfg.weight_decay)
    gate = torch.optim.Adam(gate_parameters(model), lr=cfg.gate_lr)
    warmup = round(cfg.warmup_share * total_steps)
    return main, gate, [warmup_cosine(opt, warmup, total_steps) for opt in (main, gate)]


def train_demo(cfg: DemoConfig, data: DemoData, tracker=None,
               on_epoch: Callable[[dict[str, float]], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a gated ViT with Gradient Routing on ``data.train``; metrics go to ``tracker`` (a Tracker or None).

    The held-out split is evaluated after every epoch (no model selection: the last epoch is kept).
    Returns the model and its state: normalisation, per-epoch history, final held-out metrics and predictions.
    """
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    n_classes = len(data.class_names)
    model = build_demo_model(cfg, n_classes)
    mean, std = channel_stats(data.train.images)
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    main, gate, schedules = _optimizers(cfg, model, cfg.epochs * steps_per_epoch)
    router = GradientRouter(model, main, gate, F.cross_entropy, main_clip=cfg.clip, gate_clip=cfg.gate_clip)
    log = tracker.log_metrics if tracker is not None else (lambda metrics, step: None)

    step, skipped, history = 0, 0, []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        losses = []
        for idx in batches(len(data.train), cfg.batch_size, generator):
            images = augment(data.train.images[idx], cfg.shift, cfg.flip, generator)
            out = router.step(normalise(images, mean, std), data.train.labels[idx])
            for schedule in schedules:
                schedule.step()
            step += 1
            if out["skipped"]:
                skipped += 1
                continue
            losses.append((out["loss"], out["gate_loss"]))
            if step % cfg.log_every == 0:
                log({"train/loss": out["loss"], "train/gate_loss": out["gate_loss"],
                     "train/lr": schedules[0].get_last_lr()[0]}, step)
            if step % cfg.gate_log_every == 0:
                log(gate_statistics(model, cfg.sparsity_threshold), step)
        train_seconds = time.perf_counter() - t0
        loss, gate_loss = np.mean(losses, axis=0) if losses else (float("nan"), float("nan"))
        row = {"epoch": epoch, "train/epoch_loss": float(loss), "train/epoch_gate_loss": float(gate_loss),
               "train/skipped_steps": skipped, "perf/epoch_seconds": train_seconds}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            metrics, table = evaluate(model, data.test, mean, std, data.class_names)
            row.update({f"test/{k}": metrics[k] for k in EPOCH_METRICS})
        history.append(row)
        log(row, step)
        if tracker is not None:
            tracker.log_gate_epoch(gate_values(model), epoch, plot=cfg.plots)
        if on_epoch is not None:
            on_epoch(row)
    return model, {"mean": mean, "std": std, "history": history, "steps": step, "test_metrics": metrics,
                   "predictions": table}


def save_demo(path: str | Path, model: nn.Module, cfg: DemoConfig, data: DemoData, state: dict[str, Any]) -> Path:
    """The gated model's state dict with what inference needs; plain types only (``weights_only`` loading)."""
    from fsg_endo.engine.checkpoint import save_checkpoint

    save_checkpoint(path, {
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": asdict(replace(cfg, weights=None)),
        "fine_tuned_from": cfg.weights, "class_names": list(data.class_names), "source": data.source,
        "mean": state["mean"], "std": state["std"],
        "epochs_trained": len(state["history"]), "test_metrics": dict(state["test_metrics"]),
    })
    return Path(path)


def load_demo(path: str | Path) -> tuple[nn.Module, DemoConfig, dict[str, Any]]:
    """A demo checkpoint as (gate-folded plain ViT in eval mode, its config, the checkpoint dict)."""
    if not Path(path).is_file():
        raise FsgEndoError(f"{path}: no demo checkpoint (train first, or pass --checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a foreign or truncated file
        raise FsgEndoError(f"{path}: not a demo checkpoint readable with weights_only=True "
                           f"({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FsgEndoError(f"{path}: not a fsg_endo demo checkpoint (format {CHECKPOINT_FORMAT} expected)")
    cfg = DemoConfig(**ckpt["config"])
    model = build_demo_model(cfg, len(ckpt["class_names"]), weights=False)
    model.load_state_dict(ckpt["model"])
    return fold_gates(model).eval(), cfg, ckpt
