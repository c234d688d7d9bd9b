"""Model factory: torchvision ViTs by preset with the study's block, the polyp-sizing wrapper, local weights.

Nothing is downloaded: torchvision constructors get no weights, and pretrained weights come from
a local file (a torchvision ViT state dict, a timm ViT checkpoint, or a checkpoint of the paper's
released FSG ViT with its gates; see ``load_local_weights``). Every encoder block is a
:class:`~fsg_endo.nn.block.ViTBlock` (plain, gated, layer-scaled, with or without drop path), so every
arm of the study runs the same block forward and the same attention.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.block import ViTBlock, replace_blocks
from fsg_endo.nn.weights import LoadReport, load_local_weights, read_state_dict, timm_to_torchvision, vit_shape

__all__ = [
    "VIT_PRESETS",
    "LoadReport",
    "SizingModel",
    "build_model",
    "drop_path_rates",
    "load_local_weights",
    "read_state_dict",
    "timm_to_torchvision",
    "vit_shape",
]  # the weight helpers live in fsg_endo.nn.weights and stay importable from here

logger = logging.getLogger(__name__)

LOG_MARGIN = 3.0  # the log-box head's size is clamped to [lo / e^3, hi * e^3]: finite, never reached

VIT_PRESETS: dict[str, dict[str, int]] = {
    "micro": {"hidden_dim": 128, "depth": 4, "heads": 4, "mlp_dim": 512},  # the CPU default
    "ti": {"hidden_dim": 192, "depth": 12, "heads": 3, "mlp_dim": 768},  # ViT-Ti, the paper's backbone
    "s": {"hidden_dim": 384, "depth": 12, "heads": 6, "mlp_dim": 1536},
    "b": {"hidden_dim": 768, "depth": 12, "heads": 12, "mlp_dim": 3072},
}


class SizingModel(nn.Module):
    """A ViT's class-token features joined with the box geometry, then a small MLP head.

    The box vector (log relative box width/height, relative centre) restores the absolute scale
    that cropping around the polyp erases (docs/interfaces.md#tasks-and-metrics). ``forward(x, box)``.

    With ``size_range=(lo, hi)`` (regression) the head predicts log(size / box side) instead: size in mm
    = exp(head + log side), side = the geometric mean of the box's relative width and height, returned
    scaled linearly from [lo, hi] to [-1, 1] like the target. Physical size is apparent size times a
    distance factor, so the head only has to read the factor from the crop, an additive term in log space.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        box_features: int,
        num_outputs: int = 1,
        size_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if size_range is not None and (num_outputs != 1 or box_features < 2):
            raise ValueError("size_range needs one output and the log box width and height as box features")
        vit.heads = nn.Identity()
        self.vit = vit
        self.box_features = box_features
        self.num_outputs = num_outputs
        self.size_range = size_range
        width = vit.hidden_dim + box_features
        self.head = nn.Sequential(nn.Linear(width, vit.hidden_dim), nn.GELU(), nn.Linear(vit.hidden_dim, num_outputs))

    def init_log_ratio(self, value: float) -> None:
        """Start the log-box head at a size of ``exp(value)`` times the box side (e.g. the training median)."""
        with torch.no_grad():
            self.head[-1].bias.fill_(value)

    def forward(self, x: Tensor, box: Tensor) -> Tensor:
        # torch._assert, as torchvision's models use it: a check that torch.fx symbolic tracing can follow.
        torch._assert(box.shape[-1] == self.box_features, f"Expected {self.box_features} box features")
        features = self.vit(x)
        box = box.to(features.dtype)
        out = self.head(torch.cat([features, box], dim=1))
        if self.size_range is None:
            return out
        lo, hi = self.size_range
        log_size = out + 0.5 * (box[:, :1] + box[:, 1:2])
        size = torch.exp(log_size.clamp(math.log(lo) - LOG_MARGIN, math.log(hi) + LOG_MARGIN))
        return 2.0 * (size - lo) / (hi - lo) - 1.0


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last block)."""
    return [rate * i / (depth - 1) if depth > 1 else rate for i in range(depth)]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """The global RNG seeded by ``seed`` inside the block and restored after it (left alone when None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _resolve_size(preset: str, overrides: dict[str, int | None]) -> dict[str, int]:
    if preset not in VIT_PRESETS:
        raise FsgEndoError(f"model.preset: unknown preset {preset!r} (choose from {', '.join(VIT_PRESETS)})")
    size = {**VIT_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if size["hidden_dim"] % size["heads"]:
        raise FsgEndoError(f"model: hidden_dim {size['hidden_dim']} is not divisible by heads {size['heads']}")
    return size


def build_model(
    preset: str = "micro",
    image_size: int = 64,
    patch_size: int = 8,
    num_outputs: int = 1,
    *,
    hidden_dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_dim: int | None = None,
    fsg: bool = False,
    box_features: int = 0,
    size_range: tuple[float, float] | None = None,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    stochastic_depth: float = 0.0,
    weights: str | os.PathLike | None = None,
    gate_seed: int | None = None,
    layer_scale: bool = False,
) -> nn.Module:
    """A torchvision ViT of the given preset (explicit sizes override it) with ``ViTBlock`` blocks:
    gated (``fsg``, FSG), layer-scaled (``layer_scale``, CaiT's LayerScale) or plain.

    ``weights`` (a local file) is loaded into the gated (or plain) ViT, so a release checkpoint brings
    its gates. ``box_features > 0`` returns a :class:`SizingModel` (``forward(x, box)``, its log-box head
    with ``size_range``); otherwise the ``VisionTransformer`` itself.
    With ``gate_seed``, the gates are drawn from their own generator seeded by it and the global RNG is
    left as it was, so the backbone and head weights equal those of the same model without gates. The layer
    scales start at the sigmoid of the gates that ``fsg`` would draw: the two models compute the same
    function at init. ``stochastic_depth`` (drop path) rises linearly over the blocks to its value.
    """
    size = _resolve_size(preset, {"hidden_dim": hidden_dim, "depth": depth, "heads": heads, "mlp_dim": mlp_dim})
    if image_size % patch_size:
        raise FsgEndoError(f"model: image_size {image_size} is not a multiple of patch_size {patch_size}")
    if fsg and stochastic_depth > 0:
        raise FsgEndoError("model: stochastic_depth is for the plain 'dropout' arm and does not combine with fsg")
    if fsg and layer_scale:
        raise FsgEndoError("model: layer_scale and fsg are two arms (a plain scale or a sigmoid gate); choose one")
    vit = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=size["depth"],
        num_heads=size["heads"],
        hidden_dim=size["hidden_dim"],
        mlp_dim=size["mlp_dim"],
        dropout=dropout,
        attention_dropout=attention_dropout,
        num_classes=num_outputs,
    )
    rates = iter(drop_path_rates(stochastic_depth, size["depth"]))

    def study_block(block: nn.Module) -> ViTBlock | None:
        if type(block) is not EncoderBlock:
            return None
        return ViTBlock.from_block(block, gates=fsg, layer_scale=layer_scale, drop_path=next(rates))

    with seeded(gate_seed):
        replace_blocks(vit.encoder, study_block)
    if weights is not None:
        report = load_local_weights(vit, weights)
        logger.info(
            "%s: loaded %d tensors (%d renamed from timm/release names), %d missing, %d skipped, %d unexpected",
            weights,
            len(report.loaded),
            len(report.mapped),
            len(report.missing),
            len(report.skipped),
            len(report.unexpected),
        )
    if box_features > 0:
        return SizingModel(vit, box_features, num_outputs, size_range)
    return vit
