"""The fast attention path: equal to torchvision's block (forward, gradients, dropout), used by every arm."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from fsg_endo.nn.attention import self_attention
from fsg_endo.nn.block import ViTBlock, replace_blocks
from fsg_endo.nn.gates import fold_gates, gate_parameters, vit_with_fsg
from fsg_endo.nn.models import build_model

TOL = {"atol": 1e-5, "rtol": 1e-5}
SMALL = {"image_size": 16, "patch_size": 8, "hidden_dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32}


def stock_block(seed: int = 0, attention_dropout: float = 0.0) -> EncoderBlock:
    torch.manual_seed(seed)
    return EncoderBlock(num_heads=4, hidden_dim=32, mlp_dim=64, dropout=0.0, attention_dropout=attention_dropout)


def forward_and_grads(block: nn.Module, x: torch.Tensor, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output, and the gradients of a fixed random projection of it w.r.t. the input and every parameter."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout draws in both blocks
    out = block(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    return out.detach(), grads


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_block_equals_torchvision_block_forward_and_gradients(mode):
    stock = stock_block()
    fast = ViTBlock.from_block(copy.deepcopy(stock))
    getattr(stock, mode)(), getattr(fast, mode)()
    x = torch.randn(3, 7, 32)
    out_stock, grads_stock = forward_and_grads(stock, x)
    out_fast, grads_fast = forward_and_grads(fast, x)
    torch.testing.assert_close(out_fast, out_stock, **TOL)
    assert grads_fast.keys() == grads_stock.keys()
    for name, grad in grads_stock.items():
        torch.testing.assert_close(grads_fast[name], grad, **TOL, msg=name)


def test_attention_dropout_acts_in_training_only_and_draws_as_torch_does():
    stock = stock_block(attention_dropout=0.5).train()
    fast = ViTBlock.from_block(copy.deepcopy(stock)).train()
    x = torch.randn(2, 9, 32)
    out_fast, grads_fast = forward_and_grads(fast, x)
    out_stock, grads_stock = forward_and_grads(stock, x)
    torch.testing.assert_close(out_fast, out_stock, **TOL)  # torch's own dropout draws, same mask
    torch.testing.assert_close(grads_fast["input"], grads_stock["input"], **TOL)
    fast.eval()
    with torch.no_grad():
        evaluated = fast(x)
        torch.testing.assert_close(fast(x), evaluated)  # no dropout in eval
        torch.testing.assert_close(evaluated, stock.eval()(x), **TOL)
    assert not torch.allclose(out_fast, evaluated, atol=1e-3)  # ... and it did act in training


def test_gated_block_equals_gates_on_torchvision_attention_with_gradients():
    stock = stock_block()
    gated = ViTBlock.from_block(copy.deepcopy(stock), gates=True)
    with torch.no_grad():
        for g in gate_parameters(gated):
            g.normal_(0, 2)

    class Reference(nn.Module):
        """The gated block written with the stock nn.MultiheadAttention call."""

        def __init__(self) -> None:
            super().__init__()
            self.block, self.gate_attn, self.gate_mlp = (
                stock,
                nn.Parameter(gated.gate_attn.detach().clone()),
                nn.Parameter(gated.gate_mlp.detach().clone()),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.block.ln_1(x)
            x = x + torch.sigmoid(self.gate_attn) * self.block.self_attention(h, h, h, need_weights=False)[0]
            return x + torch.sigmoid(self.gate_mlp) * self.block.mlp(self.block.ln_2(x))

    reference = Reference().train()
    x = torch.randn(4, 5, 32)
    out, grads = forward_and_grads(gated.train(), x)
    out_ref, grads_ref = forward_and_grads(reference, x)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(grads["input"], grads_ref["input"], **TOL)
    for name in ("gate_attn", "gate_mlp"):
        torch.testing.assert_close(grads[name], grads_ref[name], **TOL)
    for name, grad in grads.items():
        if name not in ("input", "gate_attn", "gate_mlp"):
            torch.testing.assert_close(grad, grads_ref["block." + name], **TOL, msg=name)


@pytest.mark.parametrize("arm", ["none", "dropout", "fsg"])
def test_no_arm_calls_the_multihead_attention_module(monkeypatch, arm):
    kwargs = {
        "none": {},
        "dropout": {"dropout": 0.1, "attention_dropout": 0.1, "stochastic_depth": 0.1},
        "fsg": {"fsg": True},
    }[arm]
    model = build_model(**SMALL, **kwargs).train()
    blocks = list(model.encoder.layers)
    assert all(type(b) is ViTBlock and (b.gate_attn is not None) == (arm == "fsg") for b in blocks)

    def refuse(*args, **kwargs):
        raise AssertionError("nn.MultiheadAttention.forward was called")

    monkeypatch.setattr(nn.MultiheadAttention, "forward", refuse)
    model(torch.randn(2, 3, 16, 16)).sum().backward()


def test_plain_fast_model_folds_to_stock_and_can_be_gated_later():
    torch.manual_seed(0)
    plain = build_model(**SMALL).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = plain(x)
    stock = fold_gates(plain)
    assert all(type(b) is EncoderBlock for b in stock.encoder.layers)
    assert stock.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(stock(x), expected, **TOL)
    gated = vit_with_fsg(plain)
    assert all(type(b) is ViTBlock and b.gate_attn is not None for b in gated.encoder.layers)


def test_swapping_in_the_fast_block_keeps_the_submodules_and_outputs():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    nn.init.normal_(vit.heads.head.weight)
    attention = [b.self_attention for b in vit.encoder.layers]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = vit.eval()(x)
        replace_blocks(vit, lambda b: ViTBlock.from_block(b) if type(b) is EncoderBlock else None)
        torch.testing.assert_close(vit(x), expected, **TOL)
    assert [b.self_attention for b in vit.encoder.layers] == attention


def test_self_attention_refuses_a_layout_it_does_not_compute():
    seq_first = nn.MultiheadAttention(16, 2)  # batch_first=False
    block = stock_block()
    block.self_attention = seq_first
    with pytest.raises(ValueError, match="batch-first"):
        ViTBlock.from_block(block)
    with pytest.raises(ValueError, match="batch-first"):
        ViTBlock.from_block(block, gates=True)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(self_attention(attn, x), attn(x, x, x, need_weights=False)[0], **TOL)
