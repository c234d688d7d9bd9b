"""The study's one ViT block: each option against the block written out in torch ops on its own weights,
LayerScale against FSG at init, and folding a layer-scaled model to a stock ViT."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.block import ViTBlock
from fsg_endo.nn.gates import fold_gates, gate_parameters, gate_statistics, gate_values, inject_fsg, non_gate_parameters
from fsg_endo.nn.models import SizingModel, build_model

TOL = {"atol": 1e-5, "rtol": 1e-5}
DIM, HEADS, MLP = 16, 2, 32
SMALL = {"image_size": 16, "patch_size": 8, "hidden_dim": 16, "depth": 3, "heads": 2, "mlp_dim": 32}


def hand_block(x, blk, s_attn=None, s_mlp=None, keep_attn=None, keep_mlp=None):
    """The block written out: pre-norm attention and MLP branches, each times its per-channel factor ``s`` and
    its per-sample keep factor (0 or 1 / survival, shape (batch, 1, 1)), added to the residual stream."""
    b, n, d = x.shape
    h = F.layer_norm(x, (d,), blk.ln_1.weight, blk.ln_1.bias, eps=1e-6)
    attn = blk.self_attention
    q, k, v = (h @ attn.in_proj_weight.T + attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (t.reshape(b, n, HEADS, d // HEADS).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(d // HEADS)).softmax(-1)
    a = (weights @ v).transpose(1, 2).reshape(b, n, d) @ attn.out_proj.weight.T + attn.out_proj.bias
    x = x + (1 if s_attn is None else s_attn) * (1 if keep_attn is None else keep_attn) * a
    h = F.layer_norm(x, (d,), blk.ln_2.weight, blk.ln_2.bias, eps=1e-6)
    fc1, fc2 = blk.mlp[0], blk.mlp[3]
    m = F.gelu(h @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    return x + (1 if s_mlp is None else s_mlp) * (1 if keep_mlp is None else keep_mlp) * m


def block(seed: int = 0, **options) -> ViTBlock:
    torch.manual_seed(seed)
    return ViTBlock(HEADS, DIM, MLP, 0.0, 0.0, **options)


def randomise(*params: torch.Tensor, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 2)  # also negative and above 1: unbounded for scales


@pytest.mark.parametrize("mode", ["train", "eval"])
@torch.no_grad()
def test_plain_block_is_the_formula_and_loads_a_stock_block(mode):
    blk = getattr(block(), mode)()
    x = torch.randn(3, 5, DIM)
    torch.testing.assert_close(blk(x), hand_block(x, blk), **TOL)
    torch.manual_seed(2)
    stock = EncoderBlock(HEADS, DIM, MLP, 0.0, 0.0).eval()
    assert blk.load_state_dict(stock.state_dict(), strict=True)  # torchvision's names, nothing extra
    torch.testing.assert_close(blk(x), stock(x), **TOL)


@torch.no_grad()
def test_gated_block_multiplies_each_branch_by_the_sigmoid_of_its_gate():
    blk = block(gates=True)
    assert set(blk.state_dict()) - set(EncoderBlock(HEADS, DIM, MLP, 0.0, 0.0).state_dict()) == {
        "gate_attn",
        "gate_mlp",
    }
    randomise(blk.gate_attn, blk.gate_mlp)
    x = torch.randn(3, 5, DIM)
    s_attn, s_mlp = 1 / (1 + torch.exp(-blk.gate_attn)), 1 / (1 + torch.exp(-blk.gate_mlp))
    torch.testing.assert_close(blk(x), hand_block(x, blk, s_attn, s_mlp), **TOL)


@torch.no_grad()
def test_layer_scale_multiplies_each_branch_by_its_unbounded_scale():
    blk = block(layer_scale=True)
    assert blk.gate_attn is None and blk.scale_attn.shape == blk.scale_mlp.shape == (DIM,)
    randomise(blk.scale_attn, blk.scale_mlp)
    assert blk.scale_attn.min() < 0 and blk.scale_mlp.max() > 1
    x = torch.randn(3, 5, DIM)
    torch.testing.assert_close(blk(x), hand_block(x, blk, blk.scale_attn, blk.scale_mlp), **TOL)


@torch.no_grad()
def test_drop_path_is_the_plain_block_in_eval():
    plain, dropping = block(), block(drop_path=0.5)
    dropping.load_state_dict(plain.state_dict())
    x = torch.randn(6, 5, DIM)
    torch.testing.assert_close(dropping.eval()(x), hand_block(x, plain), **TOL)


@pytest.mark.parametrize("layer_scale", [False, True])
@torch.no_grad()
def test_drop_path_drops_whole_rows_per_branch_in_training(layer_scale):
    p, batch = 0.4, 32
    blk = block(drop_path=p, layer_scale=layer_scale).train()
    if layer_scale:
        randomise(blk.scale_attn, blk.scale_mlp)
    x = torch.randn(batch, 5, DIM)
    torch.manual_seed(11)  # the two branches draw one Bernoulli(1 - p) per sample each, attention first
    keep_attn = torch.empty(batch, 1, 1).bernoulli_(1 - p) / (1 - p)
    keep_mlp = torch.empty(batch, 1, 1).bernoulli_(1 - p) / (1 - p)
    assert 0 < int((keep_attn == 0).sum()) < batch and 0 < int((keep_mlp == 0).sum()) < batch
    torch.manual_seed(11)
    out = blk(x)
    s_attn, s_mlp = (blk.scale_attn, blk.scale_mlp) if layer_scale else (None, None)
    torch.testing.assert_close(out, hand_block(x, blk, s_attn, s_mlp, keep_attn, keep_mlp), **TOL)
    both_dropped = ((keep_attn == 0) & (keep_mlp == 0)).flatten()
    torch.testing.assert_close(out[both_dropped], x[both_dropped], atol=0, rtol=0)


def test_gates_and_layer_scale_are_two_options_not_one():
    with pytest.raises(ValueError, match="layer scale"):
        block(gates=True, layer_scale=True)
    with pytest.raises(FsgEndoError, match="layer_scale"):
        build_model(**SMALL, fsg=True, layer_scale=True)
    with pytest.raises(ValueError, match="layer scale"):
        inject_fsg(build_model(**SMALL, layer_scale=True))


def model_pair(seed: int, gate_seed: int | None, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    gated = build_model(**SMALL, fsg=True, gate_seed=gate_seed, **kwargs)
    torch.manual_seed(seed)
    scaled = build_model(**SMALL, layer_scale=True, gate_seed=gate_seed, **kwargs)
    return gated, scaled


@pytest.mark.parametrize("gate_seed", [17, None])
def test_layer_scale_and_fsg_models_of_one_seed_compute_the_same_function_at_init(gate_seed):
    sizing = {"box_features": 4, "size_range": (0.5, 20.0)}
    gated, scaled = model_pair(0, gate_seed, **sizing)
    own = gated.state_dict()
    for name, value in scaled.state_dict().items():
        key = name.replace("scale_", "gate_")
        expected = torch.sigmoid(own[key]) if "scale_" in name else own[key]
        assert torch.equal(value, expected), name
    assert len(own) == len(scaled.state_dict())
    x, box = torch.randn(4, 3, 16, 16), torch.randn(4, 4)
    with torch.no_grad():
        torch.testing.assert_close(scaled.eval()(x, box), gated.eval()(x, box), atol=0, rtol=0)
    if gate_seed is not None:  # ... and the gates do depend on their seed
        _, other = model_pair(0, gate_seed + 1, **sizing)
        assert not torch.equal(other.vit.encoder.layers[0].scale_attn, scaled.vit.encoder.layers[0].scale_attn)


def test_layer_scales_are_trained_with_the_backbone_not_as_gates():
    model = build_model(**SMALL, layer_scale=True, gate_seed=3)
    scales = [p for n, p in model.named_parameters() if "scale_" in n]
    assert len(scales) == 2 * SMALL["depth"]
    assert gate_parameters(model) == [] and gate_values(model) == {} and gate_statistics(model) == {}
    assert {id(p) for p in non_gate_parameters(model)} == {id(p) for p in model.parameters()}
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)


def test_a_layer_scaled_model_folds_to_a_stock_vit_with_equal_outputs():
    torch.manual_seed(0)
    model = build_model(**SMALL, layer_scale=True, box_features=4, size_range=(0.5, 20.0)).eval()
    randomise(*[p for n, p in model.named_parameters() if "scale_" in n])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, box = torch.randn(4, 3, 16, 16), torch.randn(4, 4)
    with torch.no_grad():
        expected = model(x, box)
    folded = fold_gates(model)
    assert type(folded) is SizingModel and type(folded.vit) is VisionTransformer
    assert all(type(b) is EncoderBlock for b in folded.vit.encoder.layers)
    assert not any("scale" in name for name, _ in folded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(folded(x, box), expected, **TOL)
    layer = "vit.encoder.layers.encoder_layer_2."
    torch.testing.assert_close(
        folded.vit.encoder.layers[2].mlp[3].weight,
        before[layer + "mlp.3.weight"] * before[layer + "scale_mlp"][:, None],
    )
    torch.testing.assert_close(
        folded.vit.encoder.layers[2].self_attention.out_proj.bias,
        before[layer + "self_attention.out_proj.bias"] * before[layer + "scale_attn"],
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched
