"""Model factory: torchvision ViTs by preset, the polyp-sizing wrapper, stochastic depth, local weights.

Nothing is downloaded: torchvision constructors get no weights, and pretrained weights come from
a local file (a torchvision ViT state dict or a timm ViT checkpoint, see ``load_local_weights``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer, interpolate_embeddings
from torchvision.ops import StochasticDepth

from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import vit_with_fsg

__all__ = [
    "VIT_PRESETS",
    "LoadReport",
    "SizingModel",
    "StochasticDepthBlock",
    "add_stochastic_depth",
    "build_model",
    "load_local_weights",
    "timm_to_torchvision",
    "vit_shape",
]

logger = logging.getLogger(__name__)

VIT_PRESETS: dict[str, dict[str, int]] = {
    "micro": {"hidden_dim": 128, "depth": 4, "heads": 4, "mlp_dim": 512},  # the CPU default
    "ti": {"hidden_dim": 192, "depth": 12, "heads": 3, "mlp_dim": 768},  # ViT-Ti, the paper's backbone
    "s": {"hidden_dim": 384, "depth": 12, "heads": 6, "mlp_dim": 1536},
    "b": {"hidden_dim": 768, "depth": 12, "heads": 12, "mlp_dim": 3072},
}


class SizingModel(nn.Module):
    """A ViT's class-token features joined with the box geometry, then a small MLP head.

    The box vector (log relative box width/height, relative centre) restores the absolute scale
    that cropping around the polyp erases (SPEC §3). ``forward(x, box)``.
    """

    def __init__(self, vit: VisionTransformer, box_features: int, num_outputs: int = 1) -> None:
        super().__init__()
        vit.heads = nn.Identity()
        self.vit = vit
        self.box_features = box_features
        self.num_outputs = num_outputs
        width = vit.hidden_dim + box_features
        self.head = nn.Sequential(nn.Linear(width, vit.hidden_dim), nn.GELU(), nn.Linear(vit.hidden_dim, num_outputs))

    def forward(self, x: Tensor, box: Tensor) -> Tensor:
        torch._assert(box.shape[-1] == self.box_features, f"Expected {self.box_features} box features")
        features = self.vit(x)
        return self.head(torch.cat([features, box.to(features.dtype)], dim=1))


class StochasticDepthBlock(nn.Module):
    """torchvision ``EncoderBlock`` whose two residual branches are dropped per sample in training."""

    def __init__(self, block: EncoderBlock, p: float) -> None:
        super().__init__()
        self.num_heads = block.num_heads
        self.ln_1 = block.ln_1
        self.self_attention = block.self_attention
        self.dropout = block.dropout
        self.ln_2 = block.ln_2
        self.mlp = block.mlp
        self.drop_path = StochasticDepth(p, mode="row")

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = input + self.drop_path(self.dropout(x))

        y = self.ln_2(x)
        y = self.mlp(y)
        return x + self.drop_path(y)


def add_stochastic_depth(vit: VisionTransformer, rate: float) -> VisionTransformer:
    """Wrap the encoder blocks with stochastic depth, rising linearly from 0 (first) to ``rate`` (last)."""
    layers = vit.encoder.layers
    depth = len(layers)
    for i, (name, block) in enumerate(layers.named_children()):
        p = rate * i / (depth - 1) if depth > 1 else rate
        setattr(layers, name, StochasticDepthBlock(block, p))
    return vit


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
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    stochastic_depth: float = 0.0,
    weights: str | os.PathLike | None = None,
    gate_seed: int | None = None,
) -> nn.Module:
    """A torchvision ViT of the given preset (explicit sizes override it), optionally gated (FSG).

    ``weights`` (a local file) is loaded before gating. ``box_features > 0`` returns a
    :class:`SizingModel` (``forward(x, box)``); otherwise the ``VisionTransformer`` itself.
    With ``gate_seed``, the gates are drawn from their own generator seeded by it and the global RNG is
    left as it was, so the backbone and head weights equal those of the same model without gates.
    """
    size = _resolve_size(preset, {"hidden_dim": hidden_dim, "depth": depth, "heads": heads, "mlp_dim": mlp_dim})
    if image_size % patch_size:
        raise FsgEndoError(f"model: image_size {image_size} is not a multiple of patch_size {patch_size}")
    if fsg and stochastic_depth > 0:
        raise FsgEndoError("model: stochastic_depth is for the plain 'dropout' arm and does not combine with fsg")
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
    if weights is not None:
        report = load_local_weights(vit, weights)
        logger.info("%s: loaded %d tensors, %d missing, %d skipped", weights, len(report.loaded),
                    len(report.missing), len(report.skipped))
    if stochastic_depth > 0:
        add_stochastic_depth(vit, stochastic_depth)
    if fsg and gate_seed is None:
        vit_with_fsg(vit)
    elif fsg:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gate_seed)
            vit_with_fsg(vit)
    if box_features > 0:
        return SizingModel(vit, box_features, num_outputs)
    return vit


@dataclass
class LoadReport:
    """What ``load_local_weights`` did: keys loaded, model keys left as they were, file keys not used."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


_BLOCK = r"encoder.layers.encoder_layer_\1"
_TIMM_TO_TORCHVISION = [
    (r"^cls_token$", "class_token"),
    (r"^pos_embed$", "encoder.pos_embedding"),
    (r"^patch_embed\.proj\.", "conv_proj."),
    (r"^blocks\.(\d+)\.norm1\.", _BLOCK + ".ln_1."),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", _BLOCK + r".self_attention.in_proj_\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.", _BLOCK + ".self_attention.out_proj."),
    (r"^blocks\.(\d+)\.norm2\.", _BLOCK + ".ln_2."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", _BLOCK + ".mlp.0."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", _BLOCK + ".mlp.3."),
    (r"^norm\.", "encoder.ln."),
    (r"^head\.", "heads.head."),
]


def timm_to_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm ViT state dict to torchvision ``VisionTransformer`` names (unknown keys kept).

    timm's fused ``qkv`` has torch's ``in_proj`` layout (q, k, v stacked by rows), so tensors are
    reused as they are.
    """
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _TIMM_TO_TORCHVISION:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                key = new_key
                break
        renamed[key] = value
    return renamed


def _load_error_reason(err: Exception) -> str:
    """The informative part of a ``torch.load`` error, on one line."""
    text = str(err)
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = detail.group(1) if detail else (text.strip().splitlines() or [type(err).__name__])[0]
    return reason.split(". Please")[0].strip()


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a local checkpoint safely (``weights_only``) and unwrap ``state_dict`` / ``model`` / DDP prefixes."""
    if not os.path.isfile(path):
        raise FsgEndoError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for foreign or corrupt files
        raise FsgEndoError(f"{path}: not a tensor checkpoint readable with weights_only=True "
                           f"({_load_error_reason(err)})") from err
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("state_dict", "model")):
        obj = next(obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict))
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)} if isinstance(obj, dict) else {}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _find_vit(model: nn.Module) -> VisionTransformer:
    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    if vit is None:
        raise TypeError(f"load_local_weights expects a model holding a VisionTransformer, got {type(model).__name__}")
    return vit


def load_local_weights(model_or_vit: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a local torchvision or timm ViT checkpoint into the (first) ``VisionTransformer`` of a model.

    Position embeddings are interpolated (bicubic over the patch grid, class token kept) when the
    grid differs; head tensors of another shape are skipped (a new task head). A file that is not
    a ViT checkpoint, or whose backbone shapes do not fit, raises :class:`FsgEndoError`.
    """
    vit = _find_vit(model_or_vit)
    state = read_state_dict(path)
    if "cls_token" in state or "patch_embed.proj.weight" in state:
        state = timm_to_torchvision(state)
    if "class_token" not in state or "encoder.pos_embedding" not in state:
        raise FsgEndoError(f"{path}: not a ViT checkpoint (no class token / position embedding tensors)")
    try:
        state = interpolate_embeddings(vit.image_size, vit.patch_size, state)
    except ValueError as err:
        raise FsgEndoError(f"{path}: cannot resize the position embedding ({err})") from err

    own = vit.state_dict()
    compatible, skipped = {}, []
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if key.startswith("heads."):
                skipped.append(key)
                continue
            raise FsgEndoError(f"{path}: {key} has shape {tuple(value.shape)} but the model expects "
                               f"{tuple(own[key].shape)} (check the model preset and patch size)")
        compatible[key] = value
    result = vit.load_state_dict(compatible, strict=False)
    skipped += [k for k in result.unexpected_keys if k.startswith("heads.")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("heads.")]
    loaded = [k for k in compatible if k not in result.unexpected_keys]
    return LoadReport(loaded=loaded, missing=list(result.missing_keys), skipped=skipped, unexpected=unexpected)


def vit_shape(path: str | os.PathLike) -> dict[str, int]:
    """``hidden_dim``, ``depth``, ``heads``, ``mlp_dim`` and ``patch_size`` of a local ViT weight file.

    Heads are not stored in a checkpoint; standard ViTs use 64 channels per head (Ti 3, S 6, B 12, L 16).
    """
    state = read_state_dict(path)
    if "cls_token" in state or "patch_embed.proj.weight" in state:
        state = timm_to_torchvision(state)
    if "conv_proj.weight" not in state or "class_token" not in state:
        raise FsgEndoError(f"{path}: not a ViT checkpoint (no patch projection / class token)")
    hidden = state["class_token"].shape[-1]
    mlp = state.get("encoder.layers.encoder_layer_0.mlp.0.weight")
    blocks = {k.split(".")[2] for k in state if k.startswith("encoder.layers.")}
    return {"hidden_dim": hidden, "depth": len(blocks), "heads": hidden // 64 if hidden % 64 == 0 else 1,
            "mlp_dim": mlp.shape[0] if mlp is not None else 4 * hidden,
            "patch_size": state["conv_proj.weight"].shape[-1]}
