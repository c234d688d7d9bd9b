"""FSG on Hugging Face ``transformers`` blocks: BERT, RoBERTa, DistilBERT, GPT-2 and ViT layers, gated in place.

A known block keeps its class, its forward and its submodules. It gains the two gate vectors
``gate_attn`` and ``gate_mlp`` as its own parameters, and the output projection of each branch (the
attention out-projection, the MLP's last linear) a forward hook that multiplies the projection's
output by sigmoid(gate), channel by channel. In every block below that projection is followed only by
dropout, which commutes with a per-channel scale, before the residual add (and, in the post-norm
BERT family, the LayerNorm after it). So the block computes ``x + s * branch(x)`` (pre-norm: GPT-2,
ViT) or ``LN(x + s * branch(x))`` (post-norm: BERT, RoBERTa, DistilBERT) whatever masks, KV cache
or output flags the installed transformers passes through its forward. The state dict is the stock
one plus ``{block}.gate_attn`` and ``{block}.gate_mlp``.

The repeated layer of a transformers model subclasses transformers' ``GradientCheckpointingLayer``.
Such a layer whose type is not known here, or a known one built with cross-attention (a third branch),
is refused with one line naming its type, never skipped. ``transformers`` is imported on first use:
``fsg_endo.nn.gates`` reaches this module only for modules of a transformers class.

The rest of the API takes a gated transformers model as it is. ``GradientRouter`` calls
``model(*inputs)`` and ``loss(output, targets)``: pass the model's leading positional arguments and
read the ``ModelOutput`` in the loss, e.g. for BERT (whose first two arguments are ``input_ids`` and
``attention_mask``; GPT-2's second is its cache, so wrap it in a module whose forward takes the mask)::

    model = inject_fsg(BertForSequenceClassification.from_pretrained(name))
    router = GradientRouter(model, main_opt, gate_opt, lambda out, y: F.cross_entropy(out.logits, y))
    router.step((batch["input_ids"], batch["attention_mask"]), batch["labels"])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn

from fsg_endo.errors import FsgEndoError

__all__ = ["BranchGate", "fold_block", "gate_block", "is_gated", "known_blocks"]

GATE_NAMES = ("gate_attn", "gate_mlp")


@dataclass(frozen=True)
class Branches:
    """Where a block's two branch output projections sit: candidate submodule paths, the first present wins
    (transformers has renamed some between releases)."""

    attn: tuple[str, ...]
    mlp: tuple[str, ...]


@cache
def known_blocks() -> dict[type, Branches]:
    """The transformers block types FSG gates, with the paths of their branch output projections."""
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.distilbert.modeling_distilbert import TransformerBlock
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.roberta.modeling_roberta import RobertaLayer
    from transformers.models.vit.modeling_vit import ViTLayer

    bert = Branches(attn=("attention.output.dense",), mlp=("output.dense",))
    return {
        BertLayer: bert,
        RobertaLayer: bert,
        TransformerBlock: Branches(attn=("attention.out_lin",), mlp=("ffn.lin2",)),
        GPT2Block: Branches(attn=("attn.c_proj",), mlp=("mlp.c_proj",)),
        ViTLayer: Branches(attn=("attention.o_proj", "attention.output.dense"), mlp=("mlp.fc2", "output.dense")),
    }


def _is_transformers_layer(module: nn.Module) -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


class BranchGate:
    """Forward hook of a branch's output projection: its output times sigmoid(``block.<name>``).

    Reads the gate from the block at every call, so the gate has one owner (the block) and one
    state-dict key, and a reloaded or moved gate is the one used.
    """

    def __init__(self, block: nn.Module, name: str) -> None:
        self.block, self.name = block, name

    def __call__(self, projection: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output * torch.sigmoid(getattr(self.block, self.name)).to(output.dtype)


def _projection(block: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    for path in paths:
        try:
            return block.get_submodule(path)
        except AttributeError:
            continue
    raise FsgEndoError(
        f"{type(block).__name__}: none of {', '.join(paths)} found; this transformers release lays the block out "
        "differently from the one FSG knows"
    )


def _projections(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    branches = known_blocks()[type(block)]
    return _projection(block, branches.attn), _projection(block, branches.mlp)


def _is_conv1d(projection: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(projection, Conv1D)


def _out_features(projection: nn.Module) -> int:
    return projection.weight.shape[1] if _is_conv1d(projection) else projection.weight.shape[0]


def _scale_outputs_(projection: nn.Module, scale: Tensor) -> None:
    """Multiply each output channel of a Linear or Conv1D (weight and bias) by ``scale`` in place."""
    weight = projection.weight
    with torch.no_grad():
        weight.mul_(scale.to(weight.dtype) if _is_conv1d(projection) else scale.to(weight.dtype).unsqueeze(1))
        if projection.bias is not None:
            projection.bias.mul_(scale.to(projection.bias.dtype))


def is_gated(module: nn.Module) -> bool:
    """Whether ``module`` is a known transformers block carrying FSG gates."""
    return type(module) in known_blocks() and all(name in module._parameters for name in GATE_NAMES)


def gate_block(module: nn.Module, new_gate: Callable[[int, Tensor], nn.Parameter]) -> nn.Module | None:
    """Gate a known transformers block in place and return it; None for a module that is no block.

    ``new_gate(dim, like)`` makes one gate vector (``fsg_endo.nn.gates`` passes its ViT init).
    Raises FsgEndoError for a transformers layer FSG does not know or one with cross-attention.
    """
    if is_gated(module):
        return module
    if type(module) not in known_blocks():
        if _is_transformers_layer(module):
            raise FsgEndoError(
                f"inject_fsg: transformers block {type(module).__name__} is not supported "
                f"(known: {', '.join(sorted(t.__name__ for t in known_blocks()))})"
            )
        return None
    if hasattr(module, "crossattention"):
        raise FsgEndoError(
            f"inject_fsg: {type(module).__name__} with cross-attention has three branches; FSG gates two"
        )
    like = next(module.parameters())
    for name, projection in zip(GATE_NAMES, _projections(module)):
        module.register_parameter(name, new_gate(_out_features(projection), like))
        projection.register_forward_hook(BranchGate(module, name))
    return module


def fold_block(module: nn.Module) -> nn.Module | None:
    """Fold the gates of a gated block into its projections, in place: the stock block; None for others."""
    if not is_gated(module):
        return None
    for name, projection in zip(GATE_NAMES, _projections(module)):
        _scale_outputs_(projection, torch.sigmoid(getattr(module, name).detach()))
        for key in [k for k, hook in projection._forward_hooks.items() if isinstance(hook, BranchGate)]:
            del projection._forward_hooks[key]
        delattr(module, name)
    return module
