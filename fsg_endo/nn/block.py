"""The study's ViT encoder block: torchvision's ``EncoderBlock`` on the fast attention path, with options.

One block serves every arm: plain, FSG gates (sigmoid(g) per channel on each residual branch), CaiT's
LayerScale (a learnable per-channel scale, unbounded) and drop path (stochastic depth). Its submodules
and state-dict names are torchvision's, so a stock block's weights load as they are, and
:meth:`ViTBlock.from_block` puts it in place of a stock block by sharing that block's submodules.
:func:`replace_blocks` is the one walker that swaps blocks inside a model (building, gating, folding).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock, MLPBlock
from torchvision.ops import StochasticDepth

from fsg_endo.nn.attention import check_fast_attention, self_attention

__all__ = ["ViTBlock", "build_on_meta", "check_materialised", "draw_gate_logits", "replace_blocks"]

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)  # torchvision's ViT norm
BLOCK_PARTS = ("ln_1", "self_attention", "dropout", "ln_2", "mlp")  # torchvision's EncoderBlock submodules


def draw_gate_logits(dim: int, like: Tensor) -> Tensor:
    """A (dim,) vector of gate logits at init: Xavier-normal on a (1, dim) tensor with the sigmoid gain, as in
    the paper. Drawn from the global RNG on ``like``'s device and dtype."""
    logits = torch.empty(1, dim, device=like.device, dtype=like.dtype)
    nn.init.xavier_normal_(logits, gain=nn.init.calculate_gain("sigmoid"))
    return logits.flatten()


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module skeleton on the meta device: no memory, no draw from the global RNG."""
    with torch.device("meta"):
        return factory()


def check_materialised(module: nn.Module) -> nn.Module:
    """Guard against a rebuilt block that kept a meta tensor its source block did not provide."""
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise RuntimeError(f"rebuilding left an uninitialised tensor in {type(module).__name__}")
    return module


def _mlp_dim(block: nn.Module) -> int:
    """The hidden width of a block's MLP: the output width of its first Linear."""
    return next(m for m in block.mlp.modules() if isinstance(m, nn.Linear)).out_features


class ViTBlock(nn.Module):
    """Transformer encoder block: torchvision's ``EncoderBlock`` with per-channel branch factors and drop path.

    ``x = input + drop_path(s_attn * dropout(attention(ln_1(input))))``,
    ``out = x + drop_path(s_mlp * mlp(ln_2(x)))``, where per channel

    - ``gates=True``: ``s = sigmoid(g)``, the FSG gates ``gate_attn`` / ``gate_mlp`` (logits);
    - ``layer_scale=True``: ``s`` is the learnable ``scale_attn`` / ``scale_mlp`` (CaiT's LayerScale),
      unbounded, starting at the sigmoid of logits drawn as the gates' are (same function at init);
    - neither: ``s = 1``, torchvision's block.

    ``drop_path`` is the probability of dropping each branch per sample in training (torchvision's
    ``StochasticDepth``, mode "row"). Attention runs through :func:`~fsg_endo.nn.attention.self_attention`.
    """

    def __init__(
        self,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
        norm_layer: Callable[..., nn.Module] = LAYER_NORM,
        *,
        gates: bool = False,
        layer_scale: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads

        # Attention block
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

        # MLP block
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

        self.drop_path = StochasticDepth(drop_path, "row")
        self._init_branch_scales(gates, layer_scale)

    def _init_branch_scales(self, gates: bool, layer_scale: bool) -> None:
        """Draw the gate logits (attention, then MLP); the layer scales are the sigmoid of logits drawn the same
        way, so a layer-scaled and a gated block built from one RNG state start as the same function."""
        if gates and layer_scale:
            raise ValueError("ViTBlock takes FSG gates or a layer scale, not both")
        dim, like = self.self_attention.embed_dim, next(self.parameters())
        self.gate_attn = self.gate_mlp = self.scale_attn = self.scale_mlp = None
        if gates:
            self.gate_attn = nn.Parameter(draw_gate_logits(dim, like))
            self.gate_mlp = nn.Parameter(draw_gate_logits(dim, like))
        if layer_scale:
            self.scale_attn = nn.Parameter(torch.sigmoid(draw_gate_logits(dim, like)))
            self.scale_mlp = nn.Parameter(torch.sigmoid(draw_gate_logits(dim, like)))

    @classmethod
    def from_block(
        cls, block: nn.Module, *, gates: bool = False, layer_scale: bool = False, drop_path: float = 0.0
    ) -> ViTBlock:
        """The block with the submodules of ``block`` (a torchvision ``EncoderBlock`` or a ``ViTBlock``), shared,
        not copied, and the given options; its gates or scales are drawn from the global RNG."""
        attn = check_fast_attention(block.self_attention)
        new = build_on_meta(
            lambda: cls(block.num_heads, attn.embed_dim, _mlp_dim(block), 0.0, attn.dropout, drop_path=drop_path)
        )
        for name in BLOCK_PARTS:
            setattr(new, name, getattr(block, name))
        new._init_branch_scales(gates, layer_scale)
        return check_materialised(new)

    def branch_scales(self) -> tuple[Tensor | None, Tensor | None]:
        """The per-channel factors of the attention and MLP branches: sigmoid(gates), the layer scales, or None."""
        if self.gate_attn is not None:
            return torch.sigmoid(self.gate_attn), torch.sigmoid(self.gate_mlp)
        return self.scale_attn, self.scale_mlp

    def forward(self, input: Tensor) -> Tensor:
        # torch._assert, as torchvision's block: a check that torch.fx symbolic tracing can follow.
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        s_attn, s_mlp = self.branch_scales()
        x = self.ln_1(input)
        x = self_attention(self.self_attention, x)
        x = self.dropout(x)
        x = self._residual(input, x, s_attn)

        y = self.ln_2(x)
        y = self.mlp(y)
        return self._residual(x, y, s_mlp)

    def _residual(self, x: Tensor, branch: Tensor, scale: Tensor | None) -> Tensor:
        """``x + drop_path(scale * branch)`` (per-sample row dropping commutes with per-channel scaling)."""
        branch = self.drop_path(branch)
        return x + branch if scale is None else torch.addcmul(x, scale, branch)

    def attn_output_layer(self) -> nn.Linear:
        """The attention out-projection, the layer the attention branch's factor folds into."""
        return self.self_attention.out_proj

    def mlp_output_layer(self) -> nn.Linear:
        """The last Linear of the MLP branch, the layer the MLP branch's factor folds into."""
        return [m for m in self.mlp.modules() if isinstance(m, nn.Linear)][-1]

    def unwrap(self) -> EncoderBlock:
        """A stock torchvision ``EncoderBlock`` sharing these submodules (gates, scales, drop path dropped)."""
        attn = self.self_attention
        stock = build_on_meta(lambda: EncoderBlock(self.num_heads, attn.embed_dim, _mlp_dim(self), 0.0, attn.dropout))
        for name in BLOCK_PARTS:
            setattr(stock, name, getattr(self, name))
        return check_materialised(stock)


def replace_blocks(module: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Put ``convert(m)`` in place of every submodule ``m`` of ``module`` where it is not None, in module order.

    ``module`` itself is converted first (its replacement is then returned); a replaced module is not
    walked into. Returns ``module``.
    """
    new = convert(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = replace_blocks(child, convert)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
