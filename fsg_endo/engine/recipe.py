"""What a run trains with, built from its config: model, optimisers, schedules and the training step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from fsg_endo.data.pipeline import box_features
from fsg_endo.data.sizes import SIZE_MAX_MM, SIZE_MIN_MM
from fsg_endo.engine.arms import ARMS
from fsg_endo.engine.backbones import vit_size
from fsg_endo.engine.distributed import DistContext
from fsg_endo.engine.evaluation import metric_mode, validation_metrics
from fsg_endo.engine.schema import CLASS_TASKS, Config
from fsg_endo.engine.tasks import Task, get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import gate_parameters, non_gate_parameters
from fsg_endo.nn.hf_text import build_text_classifier
from fsg_endo.nn.mae import MaskedAutoencoder
from fsg_endo.nn.models import build_model
from fsg_endo.nn.routing import GradientRouter, train_step

BOX_FEATURES = 4  # log box w, log box h (relative to the frame), box centre x, y
GATE_STREAM = 1  # the gates' generator is the SeedSequence of (seed, GATE_STREAM)


def uses_gates(regularizer: str) -> bool:
    """Whether the arm's model carries FSG gates (logged as the param ``fsg.enabled``); False for a name
    that is no arm (e.g. a run without the tag)."""
    return regularizer in ARMS and ARMS[regularizer].gated


def uses_routing(regularizer: str) -> bool:
    """Whether the arm trains with Gradient Routing (logged as the param ``gr.enabled``)."""
    return regularizer in ARMS and ARMS[regularizer].routed


def accumulates_gate_pass(cfg: Config) -> bool:
    """Whether GR carries the gate pass's gradients into the main step: the arm's row says so (the paper's
    released code) or ``gr.accumulate_gate_pass_grads`` is set."""
    return ARMS[cfg.regularizer].accumulates_gate_pass or cfg.gr.accumulate_gate_pass_grads


def build_for(cfg: Config, task: Task, train_rows: pd.DataFrame | None = None) -> torch.nn.Module:
    """The model of the config's regulariser: gated for the FSG arms, dropout only for ``dropout``; for task
    ``pretrain_mae`` the plain ViT inside a masked autoencoder; for ``text_class`` the transformers classifier of
    ``model.hf_model``.

    Every arm of one seed starts from the same backbone and head weights: the gates come from their own
    generator, seeded by ``seed``, and leave the global RNG where it was. A log-box head starts at the
    median log(size / box side) of ``train_rows`` (when given; a checkpoint or saved model brings its own)."""
    m, arm = cfg.model, ARMS[cfg.regularizer]
    if cfg.task == "text_class":
        pretrained = m.hf_init == "pretrained"
        return build_text_classifier(m.hf_model, task.class_names, pretrained, arm.gated, gate_seed(cfg.seed))
    extra = dict(dropout=m.dropout, attention_dropout=m.attention_dropout, stochastic_depth=m.stochastic_depth)
    log_box = m.size_head == "log_box"
    model = build_model(
        m.preset,
        cfg.data.image_size,
        num_outputs=task.num_outputs,
        **vit_size(m),  # the shape of model.weights when given, and their local file
        fsg=arm.gated,
        box_features=BOX_FEATURES if m.box_features else 0,
        size_range=(SIZE_MIN_MM, SIZE_MAX_MM) if log_box else None,
        gate_seed=gate_seed(cfg.seed),
        **(extra if arm.dropout else {}),
        **arm.model_options,
    )
    if log_box and train_rows is not None:
        model.init_log_ratio(log_size_per_side(train_rows))
    if cfg.task == "pretrain_mae":
        p = cfg.pretrain
        return MaskedAutoencoder(
            model, p.mask_ratio, p.decoder_dim, p.decoder_depth, p.decoder_heads, normalize=p.normalize_patches
        )
    return model


def log_size_per_side(rows: pd.DataFrame) -> float:
    """Median over manifest rows of log(size in mm / box side), side as the model's box features give it."""
    boxes = box_features(rows[["xmin", "ymin", "xmax", "ymax"]].to_numpy(), rows[["width", "height"]].to_numpy())
    return float(np.median(np.log(rows["size_mm"].to_numpy(float)) - 0.5 * (boxes[:, 0] + boxes[:, 1])))


def gate_seed(seed: int) -> int:
    """The seed of the gates' own generator: a stream of ``seed`` apart from the backbone's."""
    return int(np.random.SeedSequence([seed, GATE_STREAM]).generate_state(1)[0])


def compiled(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile(model)`` when ``optim.compile`` is set and the run is on CUDA, else ``model`` itself.

    CUDA only by design: the ``paper`` profile (a GPU setting) turns it on, and on CPU a compile costs
    minutes for little gain (docs/benchmarks.md). Parameters stay shared with ``model``.
    """
    return torch.compile(model) if cfg.optim.compile and device.type == "cuda" else model


def adam(params: Any, lr: float, weight_decay: float = 0.0, decoupled: bool = False) -> torch.optim.Adam:
    """Adam with the multi-tensor (``foreach``) update on every device (PyTorch's default on CUDA only): the
    same update as the per-parameter loop, in a few kernels instead of one small loop per tensor. ``decoupled``:
    AdamW's weight decay (the weights shrink by ``lr * weight_decay`` a step) instead of an L2 term in the
    gradient, which Adam's normalisation turns into a pull of about ``lr`` a step on every small-gradient weight."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled, foreach=True)


def build_optimizers(cfg: Config, model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    """GR: two optimisers over disjoint sets. Joint FSG: one optimiser, gates in their own group.
    Frozen FSG: the gates keep their init (``requires_grad=False``, in no optimiser)."""
    o, gr, arm = cfg.optim, cfg.gr, ARMS[cfg.regularizer]
    if arm.frozen_gates:
        for gate in gate_parameters(model):
            gate.requires_grad_(False)
    if arm.routed:
        return {
            "main": adam(non_gate_parameters(model), o.lr, o.weight_decay, o.decoupled_weight_decay),
            "gate": adam(gate_parameters(model), gr.gate_lr),
        }
    groups = [{"params": non_gate_parameters(model)}]
    if arm.gated and not arm.frozen_gates:
        groups.append({"params": gate_parameters(model), "lr": gr.gate_lr, "weight_decay": 0.0})
    return {"main": adam(groups, o.lr, o.weight_decay, o.decoupled_weight_decay)}


def selection_metric(metric: str, task: Task) -> str:
    """The validation metric that selects the best epoch: ``eval.metric``, or the task's main one for ``auto``.
    A name :func:`~fsg_endo.engine.evaluation.evaluate` does not return is an error (else no epoch is best)."""
    if metric == "auto":
        return f"val/{task.main_metric}"
    names = validation_metrics(task)
    if metric not in names:
        raise FsgEndoError(
            f"eval.metric = {metric!r} is not a validation metric of task {task.name}; "
            f"choose auto or one of {', '.join(names)}"
        )
    return metric


def check_eval_metric(cfg: Config) -> None:
    """``eval.metric`` checked before any data is read. An ``image_class`` or ``text_class`` per-class F1
    (``val/f1_<class>``) waits for the classes, which come with the data: :func:`build_recipe` checks it then."""
    class_task = cfg.task in CLASS_TASKS
    if class_task and cfg.eval.metric.startswith("val/f1_"):
        return
    selection_metric(cfg.eval.metric, get_task(cfg.task, class_names=("any",) if class_task else ()))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Recipe:
    """The objects of one run. ``model`` is the plain module (evaluation, checkpoints, gates); ``step``
    trains it on one batch, through DistributedDataParallel under torchrun."""

    cfg: Config
    task: Task
    device: torch.device
    model: torch.nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    step: Callable[[Any, torch.Tensor], dict[str, float | bool]]
    metric: str  # the validation metric that selects the best epoch
    mode: str  # "min" or "max"

    @property
    def use_box(self) -> bool:
        return self.cfg.model.box_features

    @property
    def gated(self) -> bool:
        return uses_gates(self.cfg.regularizer)


def build_recipe(
    cfg: Config,
    ctx: DistContext,
    steps_per_epoch: int,
    class_names: Sequence[str] = (),
    train_rows: pd.DataFrame | None = None,
) -> Recipe:
    """Model, optimisers, warmup-cosine schedules and the step (Gradient Routing for the ``fsg_gr`` arms);
    ``class_names``: the classes of the data, for ``image_class``; ``train_rows``: the training manifest
    rows, where the log-box head takes its start."""
    device = ctx.device(cfg.device)
    amp = cfg.optim.amp and device.type == "cuda"
    loss = cfg.loss
    task = get_task(cfg.task, loss.main_weights, loss.gate_weights, class_names, loss.beta, cfg.pretrain.picture_every)
    model = build_for(cfg, task, train_rows).to(device)
    optimizers = build_optimizers(cfg, model)
    epochs, warmup = cfg.optim.epochs, cfg.optim.warmup_epochs * steps_per_epoch
    schedulers = {k: warmup_cosine(o, warmup, epochs * steps_per_epoch) for k, o in optimizers.items()}
    clip, gr = cfg.optim.clip, cfg.gr
    fast = compiled(cfg, model, device)  # both GR passes and the plain step run this module
    if ARMS[cfg.regularizer].routed:
        trained = ctx.wrap(fast, device, ignore=gate_parameters(model))  # the router all-reduces the gates
        step = GradientRouter(
            trained,
            optimizers["main"],
            optimizers["gate"],
            task.main_loss,
            task.gate_loss,
            main_clip=clip,
            gate_clip=gr.gate_clip,
            amp=amp,
            accumulate_gate_pass_grads=accumulates_gate_pass(cfg),
        ).step
    else:
        step = partial(train_step, ctx.wrap(fast, device), optimizers["main"], task.main_loss, clip=clip, amp=amp)
    metric = selection_metric(cfg.eval.metric, task)
    return Recipe(cfg, task, device, model, optimizers, schedulers, step, metric, metric_mode(metric))
