"""Gradient Routing (GR): gates and backbone trained by two optimisers in two passes (README.md#the-method-in-short).

The parameter split is read from the two optimisers, so the router works for any model whose
gates and backbone are handed to different optimisers. Both passes refuse to step on a
non-finite loss or gradient norm and report the skip instead.

Under DistributedDataParallel (the model passed in is the DDP wrapper) the main pass runs through
DDP, which averages the backbone gradients; the gate pass runs on the wrapped module, because
``torch.autograd.grad`` bypasses DDP's hooks, and averages the gate gradients itself. Every rank
takes the same skip decision (the loss check is agreed by an all-reduce; gradient norms are equal
after averaging), so no rank waits for a collective another one skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["GradientRouter", "train_step"]

LossFn = Callable[[Any, Any], Tensor]
Inputs = Tensor | Sequence[Tensor]


def _trainable(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters an optimiser updates (those that require grad)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _forward_loss(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Any, amp: bool) -> Tensor:
    """``loss_fn(model(*inputs), targets)``, under bf16 autocast when ``amp`` and the model is on CUDA.

    The loss is computed inside the autocast region, where standard losses (MSE, smooth-L1,
    cross-entropy) run in float32.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp and device_type == "cuda"):
        return loss_fn(model(*args), targets)


def _process_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group of a DDP-wrapped model; None when training in one process."""
    return model.process_group if isinstance(model, DistributedDataParallel) else None


def _finite_everywhere(value: float, model: nn.Module) -> bool:
    """Whether the loss is finite on every rank: all ranks then skip (or step) together."""
    finite = math.isfinite(value)
    group = _process_group(model)
    if group is None:
        return finite
    flag = torch.tensor([0.0 if finite else 1.0], device=next(model.parameters()).device)
    dist.all_reduce(flag, group=group)
    return float(flag) == 0.0


def _average_gradients(params: list[Tensor], group: dist.ProcessGroup) -> None:
    """Average the gradients of ``params`` over the ranks of ``group`` (one flat all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for param, chunk in zip(params, flat.split([g.numel() for g in grads])):
        param.grad = chunk.view_as(param)


def _clip_and_step(optimizer: torch.optim.Optimizer, params: list[Tensor], clip: float | None) -> float:
    """Clip the gradients to max-norm ``clip``, step unless the norm is non-finite, zero the gradients.

    Returns the pre-clip gradient norm (non-finite means the step was skipped).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if clip is None:
        norm = float(torch.nn.utils.get_total_norm(grads, foreach=True)) if grads else 0.0
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True))
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    clip: float | None = 10.0,
    amp: bool = False,
) -> dict[str, float | bool]:
    """One plain optimiser step: forward, ``loss_fn(outputs, targets)``, backward, clip, step.

    Gradients are computed for the optimiser's parameters only and added to any they already hold
    (how the released GR code carries the gate pass into the main step); the step leaves them
    zeroed. A non-finite loss or gradient norm skips the step: ``{"loss", "grad_norm", "skipped"}``.
    ``model`` may be a DistributedDataParallel wrapper (the gradients are then averaged over ranks).
    """
    params = _trainable(optimizer)
    loss = _forward_loss(model, loss_fn, inputs, targets, amp)
    value = float(loss.detach())
    if not _finite_everywhere(value, model):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": value, "grad_norm": math.nan, "skipped": True}
    loss.backward(inputs=params)
    norm = _clip_and_step(optimizer, params, clip)
    return {"loss": value, "grad_norm": norm, "skipped": not math.isfinite(norm)}


class GradientRouter:
    """One GR step per batch: a gate pass (gate optimiser only) then a main pass (main optimiser only).

    ``main_optimizer`` must hold the backbone parameters and ``gate_optimizer`` the gates
    (``non_gate_parameters`` / ``gate_parameters``). ``gate_loss=None`` uses ``main_loss`` for
    both passes. With ``accumulate_gate_pass_grads`` the gate pass back-propagates into the
    backbone too and the main step sees the sum, as the paper's released code does.
    ``amp`` runs the forward passes under bfloat16 autocast on CUDA (ignored on CPU).
    ``model`` may be a DistributedDataParallel wrapper whose gates DDP ignores (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        main_optimizer: torch.optim.Optimizer,
        gate_optimizer: torch.optim.Optimizer,
        main_loss: LossFn,
        gate_loss: LossFn | None = None,
        main_clip: float | None = 10.0,
        gate_clip: float | None = 32.0,
        accumulate_gate_pass_grads: bool = False,
        amp: bool = False,
    ) -> None:
        self.model = model
        self.gate_model = model.module if isinstance(model, DistributedDataParallel) else model
        self.main_optimizer = main_optimizer
        self.gate_optimizer = gate_optimizer
        self.main_loss = main_loss
        self.gate_loss = gate_loss if gate_loss is not None else main_loss
        self.main_clip = main_clip
        self.gate_clip = gate_clip
        self.accumulate_gate_pass_grads = accumulate_gate_pass_grads
        self.amp = amp
        self.gate_params = _trainable(gate_optimizer)
        self.main_params = _trainable(main_optimizer)
        if not self.gate_params:
            raise ValueError("GradientRouter: the gate optimiser holds no trainable parameters")
        if {id(p) for p in self.gate_params} & {id(p) for p in self.main_params}:
            raise ValueError("GradientRouter: the gate and main optimisers share parameters")

    def step(self, inputs: Inputs, targets: Any) -> dict[str, float | bool]:
        """Gate pass then main pass on one batch: ``{"loss", "gate_loss", "grad_norm",
        "gate_grad_norm", "skipped"}`` (``skipped`` is True when either pass refused to step)."""
        self.main_optimizer.zero_grad(set_to_none=True)
        self.gate_optimizer.zero_grad(set_to_none=True)
        gate = self._gate_pass(inputs, targets)
        main = train_step(
            self.model, self.main_optimizer, self.main_loss, inputs, targets, clip=self.main_clip, amp=self.amp
        )
        return {
            "loss": main["loss"],
            "gate_loss": gate["loss"],
            "grad_norm": main["grad_norm"],
            "gate_grad_norm": gate["grad_norm"],
            "skipped": bool(gate["skipped"] or main["skipped"]),
        }

    def _gate_pass(self, inputs: Inputs, targets: Any) -> dict[str, float | bool]:
        """Forward, gate loss, gradients, clip and step of the gate optimiser only."""
        loss = _forward_loss(self.gate_model, self.gate_loss, inputs, targets, self.amp)
        value = float(loss.detach())
        if not _finite_everywhere(value, self.model):
            self.gate_optimizer.zero_grad(set_to_none=True)
            return {"loss": value, "grad_norm": math.nan, "skipped": True}
        if self.accumulate_gate_pass_grads:
            loss.backward(inputs=self.gate_params + self.main_params)
        else:
            # Gradients w.r.t. the gates only: autograd skips every backbone weight gradient.
            grads = torch.autograd.grad(loss, self.gate_params, allow_unused=True)
            for param, grad in zip(self.gate_params, grads):
                param.grad = grad
        group = _process_group(self.model)
        if group is not None:
            # Backbone gradients of the accumulate mode stay local: DDP averages their sum in the main pass.
            _average_gradients(self.gate_params, group)
        norm = _clip_and_step(self.gate_optimizer, self.gate_params, self.gate_clip)
        skipped = not math.isfinite(norm)
        if skipped:
            # Never carry a poisoned gate pass into the main step.
            self.main_optimizer.zero_grad(set_to_none=True)
        return {"loss": value, "grad_norm": norm, "skipped": skipped}
