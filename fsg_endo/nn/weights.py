"""Local ViT checkpoints in and out: torchvision, timm, and the paper's released FSG ViT with its gates.

The release is a timm ViT whose blocks carry the FSG gates as ``blocks.{i}.fsag_rgb_ls1`` (attention
branch) and ``blocks.{i}.fsag_rgb_ls2`` (MLP branch), raw logits passed through a sigmoid as ours are.
Its trainer saves ``{"model_state_dict": ...}`` of a wrapper that holds the ViT as ``model``. One name
table serves both directions: :func:`load_local_weights` reads such files, and
:func:`to_release_state_dict` writes our gated ViT back in that layout.

Files are ``torch.save`` checkpoints (read with ``weights_only=True``) or ``.safetensors`` files (timm's
format on the Hugging Face hub), which are read here with torch alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import gated_blocks

__all__ = [
    "LoadReport",
    "foreign_keys",
    "load_local_weights",
    "read_safetensors",
    "read_state_dict",
    "timm_to_torchvision",
    "to_release_state_dict",
    "vit_shape",
]

_LAYER = "encoder.layers.encoder_layer_{i}"
# (timm / release name, torchvision / our name); {i} is a block index, {p} "weight" or "bias"
_NAMES = [
    ("cls_token", "class_token"),
    ("pos_embed", "encoder.pos_embedding"),
    ("patch_embed.proj.{p}", "conv_proj.{p}"),
    ("blocks.{i}.norm1.{p}", _LAYER + ".ln_1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", _LAYER + ".self_attention.in_proj_{p}"),  # same (q; k; v) row layout
    ("blocks.{i}.attn.proj.{p}", _LAYER + ".self_attention.out_proj.{p}"),
    ("blocks.{i}.fsag_rgb_ls1", _LAYER + ".gate_attn"),
    ("blocks.{i}.norm2.{p}", _LAYER + ".ln_2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", _LAYER + ".mlp.0.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", _LAYER + ".mlp.3.{p}"),
    ("blocks.{i}.fsag_rgb_ls2", _LAYER + ".gate_mlp"),
    ("norm.{p}", "encoder.ln.{p}"),
    ("head.{p}", "heads.head.{p}"),
]
_RELEASE_PREFIX = "model."  # the release wrapper's attribute holding the ViT


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(escaped)


_TO_OURS = [(_pattern(timm), ours) for timm, ours in _NAMES]
_TO_TIMM = [(_pattern(ours), timm) for timm, ours in _NAMES]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, template in table:
        match = pattern.fullmatch(key)
        if match:
            return template.format(**match.groupdict())
    return key


def timm_to_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm (or release) ViT state dict to torchvision ``VisionTransformer`` names; unknown keys kept.

    timm's fused ``qkv`` has torch's ``in_proj`` layout (q, k, v stacked by rows), so tensors are reused
    as they are; the release gates become ``gate_attn`` / ``gate_mlp`` of the gated blocks.
    """
    return {_rename(key, _TO_OURS): value for key, value in state.items()}


def to_release_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our gated ViT's weights under the release's names (``model.blocks.0.fsag_rgb_ls1``, ...).

    ``torch.save({"model_state_dict": to_release_state_dict(model)}, path)`` writes a file in the layout
    of the release's checkpoints. Tensors are detached copies on the CPU.
    """
    vit = _find_vit(model)
    if not gated_blocks(vit):
        raise ValueError("to_release_state_dict expects a gated ViT (vit_with_fsg or build_model(fsg=True))")
    own = vit.state_dict()
    unknown = [key for key in own if _rename(key, _TO_TIMM) == key]
    if unknown:
        raise ValueError(f"to_release_state_dict: no release name for {', '.join(unknown[:3])}")
    return {_RELEASE_PREFIX + _rename(key, _TO_TIMM): value.detach().cpu().clone() for key, value in own.items()}


def _load_error_reason(err: Exception) -> str:
    """The informative part of a ``torch.load`` error, on one line."""
    text = str(err)
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = detail.group(1) if detail else (text.strip().splitlines() or [type(err).__name__])[0]
    return reason.split(". Please")[0].strip()


_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
_SIZING_PREFIX = "vit."  # a SizingModel's backbone (our run checkpoints, a logged sizing model's tensors)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file: an 8-byte little-endian header length, a JSON header of
    ``name: {dtype, shape, data_offsets}``, then the little-endian data those offsets index."""
    data = bytearray(Path(path).read_bytes())
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        state = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (8 + size + offset for offset in info["data_offsets"])
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            tensor = torch.empty(0, dtype=dtype)
            if end > begin:
                tensor = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
            state[name] = tensor.reshape(info["shape"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise FsgEndoError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a local checkpoint safely (``weights_only``, or a ``.safetensors`` file); unwrap ``state_dict`` /
    ``model_state_dict`` / ``model`` entries, a common ``module.`` (DDP) or ``model.`` (release wrapper) key
    prefix, and a sizing model's ``vit.`` backbone (its box head dropped)."""
    if not os.path.isfile(path):
        raise FsgEndoError(f"{path}: weight file not found")
    if str(path).endswith(".safetensors"):
        obj = read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for foreign or corrupt files
            raise FsgEndoError(
                f"{path}: not a tensor checkpoint readable with weights_only=True ({_load_error_reason(err)})"
            ) from err
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in _NESTING_KEYS):
        obj = next(obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict))
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)} if isinstance(obj, dict) else {}
    for prefix in ("module.", _RELEASE_PREFIX):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    if _SIZING_PREFIX + "class_token" in state:
        state = {k.removeprefix(_SIZING_PREFIX): v for k, v in state.items() if k.startswith(_SIZING_PREFIX)}
    return state


@dataclass
class LoadReport:
    """What ``load_local_weights`` did: keys loaded (our names), file keys renamed to ours (file name ->
    ours), model keys left as they were, head keys skipped, file keys the model does not have."""

    loaded: list[str] = field(default_factory=list)
    mapped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _find_vit(model: nn.Module) -> VisionTransformer:
    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    if vit is None:
        raise TypeError(f"expected a model holding a VisionTransformer, got {type(model).__name__}")
    return vit


def load_local_weights(model_or_vit: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a local torchvision, timm or release checkpoint into the (first) ``VisionTransformer`` of a model.

    Release gates load into a gated model (and are reported unexpected by a plain one). Position
    embeddings are interpolated (bicubic over the patch grid, class token kept) when the grid differs;
    head tensors of another shape are skipped (a new task head). A file that is not a ViT checkpoint,
    or whose backbone shapes do not fit, raises :class:`FsgEndoError`.
    """
    vit = _find_vit(model_or_vit)
    state = read_state_dict(path)
    mapped = {}
    if "cls_token" in state or "patch_embed.proj.weight" in state:
        mapped = {key: _rename(key, _TO_OURS) for key in state if _rename(key, _TO_OURS) != key}
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
            raise FsgEndoError(
                f"{path}: {key} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(own[key].shape)} (check the model preset and patch size)"
            )
        compatible[key] = value
    result = vit.load_state_dict(compatible, strict=False)
    skipped += [k for k in result.unexpected_keys if k.startswith("heads.")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("heads.")]
    loaded = [k for k in compatible if k not in result.unexpected_keys]
    return LoadReport(
        loaded=loaded, mapped=mapped, missing=list(result.missing_keys), skipped=skipped, unexpected=unexpected
    )


def _torchvision_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """A local file's tensors under torchvision names (timm and release names renamed)."""
    state = read_state_dict(path)
    return timm_to_torchvision(state) if "cls_token" in state or "patch_embed.proj.weight" in state else state


def foreign_keys(path: str | os.PathLike) -> list[str]:
    """Tensors of a local ViT weight file that a torchvision ViT (with FSG gates) has no place for, e.g. timm's
    layer scales (``blocks.0.ls1.gamma``), register tokens or ``fc_norm``: loading would drop them."""
    return [key for key in _torchvision_state(path) if _rename(key, _TO_TIMM) == key]


def vit_shape(path: str | os.PathLike) -> dict[str, int]:
    """``hidden_dim``, ``depth``, ``heads``, ``mlp_dim`` and ``patch_size`` of a local ViT weight file.

    Heads are not stored in a checkpoint; standard ViTs use 64 channels per head (Ti 3, S 6, B 12, L 16).
    """
    state = _torchvision_state(path)
    if "conv_proj.weight" not in state or "class_token" not in state:
        raise FsgEndoError(f"{path}: not a ViT checkpoint (no patch projection / class token)")
    hidden = state["class_token"].shape[-1]
    mlp = state.get("encoder.layers.encoder_layer_0.mlp.0.weight")
    blocks = {k.split(".")[2] for k in state if k.startswith("encoder.layers.")}
    return {
        "hidden_dim": hidden,
        "depth": len(blocks),
        "heads": hidden // 64 if hidden % 64 == 0 else 1,
        "mlp_dim": mlp.shape[0] if mlp is not None else 4 * hidden,
        "patch_size": state["conv_proj.weight"].shape[-1],
    }
