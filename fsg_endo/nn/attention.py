"""One self-attention path for every ViT block of the study: a fused qkv Linear, SDPA, the out-projection.

torchvision's ``EncoderBlock`` calls ``nn.MultiheadAttention``, whose training path transposes and
copies q, k and v around ``F.scaled_dot_product_attention``; timm's ViT calls SDPA on views of one qkv
Linear. :func:`self_attention` is the timm path on the ``nn.MultiheadAttention``'s own parameters, so
the plain, stochastic-depth and gated blocks keep torchvision's modules and state-dict names, compute
the same numbers, and none of them pays for a slower attention than another.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock

__all__ = ["FastEncoderBlock", "check_fast_attention", "self_attention", "stock_encoder_block", "use_fast_attention"]


def check_fast_attention(attn: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """``attn`` if :func:`self_attention` computes what it computes (batch first, packed qkv, no extras)."""
    if not (attn.batch_first and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn):
        raise ValueError(
            "self_attention needs a batch-first nn.MultiheadAttention with a packed in-projection, "
            "no bias_k/bias_v and no add_zero_attn (as torchvision's EncoderBlock builds it)"
        )
    return attn


def self_attention(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """Multi-head self-attention of ``x`` (batch, tokens, dim) with ``attn``'s parameters, no mask.

    Equals ``attn(x, x, x, need_weights=False)[0]``; attention dropout applies in training mode only.
    """
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim), views
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, d))


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module skeleton on the meta device: no memory, no draw from the global RNG."""
    with torch.device("meta"):
        return factory()


def check_materialised(module: nn.Module) -> nn.Module:
    """Guard against a rebuilt block that kept a meta tensor its source block did not provide."""
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise RuntimeError(f"unwrapping left an uninitialised tensor in {type(module).__name__}")
    return module


_BLOCK_PARTS = ("ln_1", "self_attention", "dropout", "ln_2", "mlp")


def stock_encoder_block(block: nn.Module) -> EncoderBlock:
    """A torchvision ``EncoderBlock`` sharing the submodules of ``block`` (any block with its parts)."""
    attn = block.self_attention
    mlp_dim = next(m for m in block.mlp.modules() if isinstance(m, nn.Linear)).out_features
    stock = build_on_meta(lambda: EncoderBlock(block.num_heads, attn.embed_dim, mlp_dim, 0.0, attn.dropout))
    for name in _BLOCK_PARTS:
        setattr(stock, name, getattr(block, name))
    return check_materialised(stock)


def share_submodules(new: nn.Module, block: nn.Module) -> None:
    """Give ``new`` the submodules of an ``EncoderBlock`` (shared, not copied), its attention on the fast path."""
    new.num_heads = block.num_heads
    new.ln_1, new.self_attention, new.dropout = block.ln_1, check_fast_attention(block.self_attention), block.dropout
    new.ln_2, new.mlp = block.ln_2, block.mlp


class FastEncoderBlock(nn.Module):
    """torchvision ``EncoderBlock`` (its submodules, shared) with the attention of :func:`self_attention`."""

    def __init__(self, block: EncoderBlock) -> None:
        super().__init__()
        share_submodules(self, block)

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x = self_attention(self.self_attention, x)
        x = self.dropout(x)
        x = x + input

        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y

    def unwrap(self) -> EncoderBlock:
        """The stock ``EncoderBlock`` with these submodules."""
        return stock_encoder_block(self)


def use_fast_attention(model: nn.Module) -> nn.Module:
    """Put a :class:`FastEncoderBlock` in place of every stock ``EncoderBlock`` inside ``model``; returns it."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is EncoderBlock:
                setattr(parent, name, FastEncoderBlock(child))
    return model
