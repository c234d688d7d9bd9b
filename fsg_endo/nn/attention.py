"""One self-attention path for every ViT block of the study: a fused qkv Linear, SDPA, the out-projection.

torchvision's ``EncoderBlock`` calls ``nn.MultiheadAttention``, whose training path transposes and
copies q, k and v around ``F.scaled_dot_product_attention``; timm's ViT calls SDPA on views of one qkv
Linear. :func:`self_attention` is the timm path on the ``nn.MultiheadAttention``'s own parameters, so
the study's block (:class:`~fsg_endo.nn.block.ViTBlock`) keeps torchvision's modules and state-dict
names and computes the same numbers as torchvision's block, with timm's speed.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["check_fast_attention", "self_attention"]


def check_fast_attention(attn: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """``attn`` if :func:`self_attention` computes what it computes (batch first, packed qkv, no extras)."""
    packed = attn.in_proj_weight is not None  # None when q, k and v have their own projections
    if not (attn.batch_first and packed and attn.bias_k is None and not attn.add_zero_attn):
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
