"""Multi-process training under ``torchrun``: process group, DDP wrapping and the few collectives the loop needs.

One :class:`DistContext` describes this process's place (rank, world size, device). Outside ``torchrun`` it
is the single-process context and every collective is the identity, so the training loop has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
# Rank 0 alone evaluates and logs while the others wait at the next collective: allow long evaluations.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and local rank of this process (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs to MLflow, evaluates and writes checkpoints."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The training device of ``name`` (auto/cpu/cuda); under torchrun each rank takes its local GPU."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def wrap(self, model: nn.Module, device: torch.device, ignore: Sequence[nn.Parameter] = ()) -> nn.Module:
        """``model`` in DistributedDataParallel (itself when single-process).

        ``ignore``: parameters DDP must neither synchronise nor wait for, because their gradients are
        computed outside its hooks (the gates of Gradient Routing, all-reduced by the router itself).
        They are broadcast from rank 0 here so every replica starts from the same values.
        """
        if not self.enabled:
            return model
        ignored = {id(p) for p in ignore}
        names = [name for name, p in model.named_parameters() if id(p) in ignored]
        # Private DDP API, kept because DDP has no public option to leave parameters out of its gradient
        # hooks: the gates are in the forward graph, so find_unused_parameters would still wait for their
        # gradients, which the main pass never computes (pytorch/pytorch#43690 tracks a public API).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        with torch.no_grad():
            for param in ignore:
                dist.broadcast(param.data, src=0)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sum of ``values`` over all ranks (one all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: T | None) -> T:
        """Rank 0's ``value`` on every rank (a picklable object, e.g. a run id or a config)."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the other ranks: shared caches are filled once, without races."""
        if not self.is_main:
            self.barrier()
        result = fn()
        if self.is_main:
            self.barrier()
        return result


SINGLE = DistContext()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def init_distributed(device_name: str = "auto", env: dict[str, Any] | None = None) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return SINGLE
    ctx = DistContext(rank=int(env["RANK"]), world_size=world_size, local_rank=int(env.get("LOCAL_RANK", 0)))
    device = ctx.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return ctx


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op when single-process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
