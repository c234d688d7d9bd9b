"""Feature Selection Gates (FSG): per-channel sigmoid gates on the two residual branches of a block.

The ViT blocks are gated by :class:`~fsg_endo.nn.block.ViTBlock` (``gates=True``), the blocks of
``torch.nn.TransformerEncoder`` by :class:`GatedTransformerEncoderLayer`. Both reuse the original block's
submodules (no copy, no ViT surgery) and add only the two gate vectors, so a torchvision or PyTorch
transformer is gated, unwrapped or folded without touching its code. See docs/interfaces.md#python-api.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from types import ModuleType

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from fsg_endo.nn.block import ViTBlock, build_on_meta, check_materialised, draw_gate_logits, replace_blocks

__all__ = [
    "GatedTransformerEncoderLayer",
    "fold_gates",
    "gate_logits",
    "gate_parameters",
    "gate_statistics",
    "gate_values",
    "gated_blocks",
    "inject_fsg",
    "non_gate_parameters",
    "vit_with_fsg",
]


def new_gate(dim: int, like: Tensor) -> nn.Parameter:
    """One gate vector at its init (:func:`~fsg_endo.nn.block.draw_gate_logits`), a parameter on ``like``'s device."""
    return nn.Parameter(draw_gate_logits(dim, like))


class GatedTransformerEncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (pre- or post-norm) with FSG gates on its two branches.

    Keeps the layer's attribute names (``self_attn``, ``norm_first``, ...), which
    ``nn.TransformerEncoder`` reads from its first layer. Never takes PyTorch's fused fast path,
    which would bypass the gates.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = layer.self_attn
        self.linear1 = layer.linear1
        self.dropout = layer.dropout
        self.linear2 = layer.linear2
        self.norm_first = layer.norm_first
        self.norm1 = layer.norm1
        self.norm2 = layer.norm2
        self.dropout1 = layer.dropout1
        self.dropout2 = layer.dropout2
        self.activation_relu_or_gelu = layer.activation_relu_or_gelu
        self.activation = layer.activation

        dim, like = layer.self_attn.embed_dim, next(layer.parameters())
        self.gate_attn = new_gate(dim, like)
        self.gate_mlp = new_gate(dim, like)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        g_attn, g_mlp = self.branch_scales()
        x = src
        if self.norm_first:
            x = torch.addcmul(x, g_attn, self._attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal))
            x = torch.addcmul(x, g_mlp, self._feed_forward(self.norm2(x)))
        else:
            x = self.norm1(torch.addcmul(x, g_attn, self._attention(x, src_mask, src_key_padding_mask, is_causal)))
            x = self.norm2(torch.addcmul(x, g_mlp, self._feed_forward(x)))
        return x

    def _attention(
        self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """The self-attention branch of torch's layer (``nn.MultiheadAttention`` brings the masks to its dtype)."""
        x = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )[0]
        return self.dropout1(x)

    def _feed_forward(self, x: Tensor) -> Tensor:
        """The feed-forward branch of torch's layer."""
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)

    def branch_scales(self) -> tuple[Tensor, Tensor]:
        """The per-channel factors of the attention and feed-forward branches: sigmoid(gates)."""
        return torch.sigmoid(self.gate_attn), torch.sigmoid(self.gate_mlp)

    def attn_output_layer(self) -> nn.Linear:
        """The attention out-projection, the layer ``gate_attn`` folds into."""
        return self.self_attn.out_proj

    def mlp_output_layer(self) -> nn.Linear:
        """The last Linear of the feed-forward branch, the layer ``gate_mlp`` folds into."""
        return self.linear2

    def unwrap(self) -> nn.TransformerEncoderLayer:
        """A plain ``TransformerEncoderLayer`` sharing this layer's submodules (gates dropped)."""
        attn = self.self_attn
        layer = build_on_meta(
            lambda: nn.TransformerEncoderLayer(
                attn.embed_dim,
                attn.num_heads,
                self.linear1.out_features,
                dropout=self.dropout.p,
                activation=self.activation,
                layer_norm_eps=self.norm1.eps,
                batch_first=attn.batch_first,
                norm_first=self.norm_first,
                bias=self.linear1.bias is not None,
            )
        )
        for name in ("self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"):
            setattr(layer, name, getattr(self, name))
        layer.activation = self.activation
        layer.activation_relu_or_gelu = self.activation_relu_or_gelu
        return check_materialised(layer)


BLOCKS = (ViTBlock, GatedTransformerEncoderLayer)  # blocks with branch factors: gates, or a ViTBlock's layer scales


def _library_blocks(module: nn.Module) -> ModuleType | None:
    """The module that gates the blocks of ``module``'s library (Hugging Face transformers), else None.

    A new block family of an optional library plugs in here; its module is imported on first use, so
    the library stays optional.
    """
    if not type(module).__module__.startswith("transformers."):
        return None
    from fsg_endo.nn import hf_blocks

    return hf_blocks


def _gate_block(module: nn.Module) -> nn.Module | None:
    """The gated block in place of a known block (None for other modules); gated blocks are kept."""
    if isinstance(module, BLOCKS) and module.gate_attn is not None:
        return module
    if isinstance(module, ViTBlock) and module.scale_attn is not None:
        raise ValueError("inject_fsg: a block with a layer scale takes no gates (layer scale and FSG are two arms)")
    if isinstance(module, ViTBlock):
        return ViTBlock.from_block(module, gates=True, drop_path=module.drop_path.p)
    if type(module) is EncoderBlock:
        return ViTBlock.from_block(module, gates=True)
    if type(module) is nn.TransformerEncoderLayer:
        return GatedTransformerEncoderLayer(module)
    library = _library_blocks(module)
    return library.gate_block(module, new_gate) if library is not None else None


def inject_fsg(module: nn.Module) -> nn.Module:
    """Gate every known transformer block inside ``module`` in place; already gated ones are kept.

    Known blocks: torchvision ``EncoderBlock`` (and the study's ``ViTBlock``), ``torch.nn.TransformerEncoderLayer``,
    and the BERT, RoBERTa, DistilBERT, GPT-2 and ViT layers of Hugging Face transformers (gated in place, see
    :mod:`fsg_endo.nn.hf_blocks`; another transformers layer raises FsgEndoError). Returns ``module`` (or the
    gated block when ``module`` itself is a block). An ``nn.TransformerEncoder`` holding gated layers no longer
    converts padded batches to nested tensors (a speed path that assumes stock layers); folding keeps that setting.
    """
    module = replace_blocks(module, _gate_block)
    for encoder in module.modules():
        # The encoder's nested-tensor path assumes stock layers; gated ones take the regular path.
        if isinstance(encoder, nn.TransformerEncoder) and gated_blocks(encoder.layers):
            encoder.use_nested_tensor = False
    return module


def vit_with_fsg(vit_backbone: VisionTransformer, num_outputs: int | None = None) -> VisionTransformer:
    """Gate every encoder block of a torchvision ``VisionTransformer`` in place, reusing its weights.

    Keeps the head, or replaces it by ``Linear(hidden_dim, num_outputs)`` when ``num_outputs`` is given.
    """
    if not isinstance(vit_backbone, VisionTransformer):
        raise TypeError(f"vit_with_fsg expects a torchvision VisionTransformer, got {type(vit_backbone).__name__}")
    inject_fsg(vit_backbone.encoder)
    if not gated_blocks(vit_backbone.encoder):
        raise TypeError("vit_with_fsg: the encoder holds no EncoderBlock to gate")
    if num_outputs is not None:
        like = vit_backbone.class_token
        head = nn.Linear(vit_backbone.hidden_dim, num_outputs, device=like.device, dtype=like.dtype)
        vit_backbone.heads = nn.Sequential(OrderedDict(head=head))
        vit_backbone.num_classes = num_outputs
        vit_backbone.representation_size = None
    return vit_backbone


def gated_blocks(model: nn.Module) -> list[nn.Module]:
    """The gated blocks of ``model``, in layer (module traversal) order."""
    return [m for m in model.modules() if (isinstance(m, BLOCKS) and m.gate_attn is not None) or _is_library_gated(m)]


def _is_library_gated(module: nn.Module) -> bool:
    library = _library_blocks(module)
    return library is not None and library.is_gated(module)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The FSG gate vectors of ``model``: what Gradient Routing hands to the gate optimiser."""
    return [g for block in gated_blocks(model) for g in (block.gate_attn, block.gate_mlp)]


def non_gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter of ``model`` (the backbone, heads and layer scales), disjoint from the gates."""
    gate_ids = {id(g) for g in gate_parameters(model)}
    return [p for p in model.parameters() if id(p) not in gate_ids]


def gate_logits(model: nn.Module) -> dict[str, Tensor]:
    """``{"attn_00": g, "mlp_00": ..., ...}``: detached copies of the raw gate vectors (e.g. their init)."""
    logits: dict[str, Tensor] = {}
    for i, block in enumerate(gated_blocks(model)):
        logits[f"attn_{i:02d}"] = block.gate_attn.detach().clone()
        logits[f"mlp_{i:02d}"] = block.gate_mlp.detach().clone()
    return logits


def gate_values(model: nn.Module) -> dict[str, Tensor]:
    """``{"attn_00": sigmoid(g), "mlp_00": ..., ...}``, detached, one entry per gated branch."""
    return {key: torch.sigmoid(g) for key, g in gate_logits(model).items()}


def gate_statistics(
    model: nn.Module, threshold: float = 0.1, init: Mapping[str, Tensor] | None = None
) -> dict[str, float]:
    """Per layer and branch: mean, std and sparsity (share of gate values below ``threshold``), and with
    ``init`` (the :func:`gate_logits` at init) the shift: mean ``|g - g_init|`` over the vector's logits.

    Keys ``gates/{attn|mlp}/layer_LL/{mean|std|sparsity|shift}`` plus ``gates/all/{mean|sparsity}`` and
    ``gates/all/{shift|shift_max}``, ready to log as MLflow metrics. Computed in one vectorised pass with a
    single host transfer.
    """
    blocks = gated_blocks(model)
    if not blocks:
        return {}
    raw = [b.gate_attn for b in blocks] + [b.gate_mlp for b in blocks]
    logits = torch.cat([g.detach().float() for g in raw])
    values = torch.sigmoid(logits)
    sizes = torch.tensor([g.numel() for g in raw], device=values.device)
    segment = torch.repeat_interleave(torch.arange(len(raw), device=values.device), sizes)
    count = sizes.to(values.dtype)

    def per_gate_sum(x: Tensor) -> Tensor:
        return torch.zeros(len(raw), device=values.device, dtype=values.dtype).index_add_(0, segment, x)

    below = (values < threshold).to(values.dtype)
    mean = per_gate_sum(values) / count
    std = (per_gate_sum((values - mean[segment]).square()) / (count - 1)).sqrt()
    names = ["mean", "std", "sparsity"]
    per_gate, overall = [mean, std, per_gate_sum(below) / count], [values.mean(), below.mean()]
    if init is not None:
        keys = [f"attn_{i:02d}" for i in range(len(blocks))] + [f"mlp_{i:02d}" for i in range(len(blocks))]
        shift = (logits - torch.cat([init[k].detach().float().to(values.device) for k in keys])).abs()
        names.append("shift")
        per_gate.append(per_gate_sum(shift) / count)
        overall += [shift.mean(), shift.max()]
    rows, totals = torch.stack(per_gate).T.tolist(), torch.stack(overall).tolist()

    stats: dict[str, float] = {}
    for i, row in enumerate(rows):
        branch, layer = ("attn", i) if i < len(blocks) else ("mlp", i - len(blocks))
        stats.update({f"gates/{branch}/layer_{layer:02d}/{name}": v for name, v in zip(names, row)})
    stats.update(zip(["gates/all/mean", "gates/all/sparsity", "gates/all/shift", "gates/all/shift_max"], totals))
    return stats


def _scale_rows_(linear: nn.Linear, scale: Tensor) -> None:
    """Multiply the output rows of ``linear`` (weight and bias) by ``scale`` in place."""
    with torch.no_grad():
        linear.weight.mul_(scale.to(linear.weight.dtype).unsqueeze(1))
        if linear.bias is not None:
            linear.bias.mul_(scale.to(linear.bias.dtype))


def _fold_block(module: nn.Module) -> nn.Module | None:
    """The stock block of a gated, layer-scaled or plain block, its branch factors multiplied into its weights."""
    library = _library_blocks(module)
    if library is not None:
        return library.fold_block(module)
    if not isinstance(module, BLOCKS):
        return None
    # The deep copy's block and its unwrapped block share submodules: scaling one scales both.
    s_attn, s_mlp = module.branch_scales()
    if s_attn is not None:
        _scale_rows_(module.attn_output_layer(), s_attn.detach())
        _scale_rows_(module.mlp_output_layer(), s_mlp.detach())
    return module.unwrap()


def fold_gates(model: nn.Module) -> nn.Module:
    """A new plain model with each sigmoid(g) (or layer scale) multiplied into the last linear of its branch.

    The input is left untouched; the result holds stock ``EncoderBlock`` /
    ``TransformerEncoderLayer`` blocks (plain fast-attention blocks become stock ones too; a transformers
    model is a stock model of its class, its gate hooks and parameters gone), costs what the plain model
    costs, and matches the input model's outputs in eval mode (dropout and drop path commute with the
    per-channel scaling).
    """
    return replace_blocks(copy.deepcopy(model), _fold_block)
