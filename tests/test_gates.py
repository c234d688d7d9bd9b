"""FSG gates: the block formula, the init, the parameter split, statistics, injection and folding."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from fsg_endo.nn.block import ViTBlock
from fsg_endo.nn.gates import (
    GatedTransformerEncoderLayer,
    fold_gates,
    gate_parameters,
    gate_statistics,
    gate_values,
    inject_fsg,
    non_gate_parameters,
    vit_with_fsg,
)

GATED = (ViTBlock, GatedTransformerEncoderLayer)


def small_vit(seed: int = 0, layers: int = 3) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        image_size=16, patch_size=4, num_layers=layers, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-inits the head, which would hide everything
    return vit


def randomise_gates(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in gate_parameters(model):
            g.copy_(torch.randn(g.shape, generator=gen) * 2)


def hand_attention(x: torch.Tensor, attn: nn.MultiheadAttention, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention written out from the module's weights (batch first)."""
    b, n, d = x.shape
    h = attn.num_heads
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def hand_encoder_block(x: torch.Tensor, blk: nn.Module, s_attn: torch.Tensor, s_mlp: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), blk.ln_1.weight, blk.ln_1.bias, eps=1e-6)
    x = x + s_attn * hand_attention(h, blk.self_attention)
    h = F.layer_norm(x, (d,), blk.ln_2.weight, blk.ln_2.bias, eps=1e-6)
    fc1, fc2 = blk.mlp[0], blk.mlp[3]
    return x + s_mlp * (F.gelu(h @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias)


@torch.no_grad()
def test_gated_block_matches_the_paper_formula():
    torch.manual_seed(0)
    block = EncoderBlock(num_heads=2, hidden_dim=16, mlp_dim=32, dropout=0.0, attention_dropout=0.0)
    gated = ViTBlock.from_block(block, gates=True)
    randomise_gates(gated)
    x = torch.randn(3, 5, 16)
    expected = hand_encoder_block(x, block, torch.sigmoid(gated.gate_attn), torch.sigmoid(gated.gate_mlp))
    torch.testing.assert_close(gated(x), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_gates_switch_branches_off_and_on():
    torch.manual_seed(0)
    block = EncoderBlock(num_heads=2, hidden_dim=16, mlp_dim=32, dropout=0.0, attention_dropout=0.0)
    x = torch.randn(2, 4, 16)
    plain_out = block(x)
    gated = ViTBlock.from_block(block, gates=True)
    gated.gate_attn.fill_(-1e4)
    gated.gate_mlp.fill_(-1e4)
    torch.testing.assert_close(gated(x), x, atol=0, rtol=0)
    gated.gate_attn.fill_(1e4)
    gated.gate_mlp.fill_(1e4)
    torch.testing.assert_close(gated(x), plain_out)


def test_gated_block_reuses_the_original_submodules():
    block = EncoderBlock(num_heads=2, hidden_dim=16, mlp_dim=32, dropout=0.1, attention_dropout=0.0)
    gated = ViTBlock.from_block(block, gates=True)
    for name in ("ln_1", "self_attention", "dropout", "ln_2", "mlp"):
        assert getattr(gated, name) is getattr(block, name)
    extra = sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in block.parameters())
    assert extra == 2 * 16
    assert gated.gate_attn.shape == gated.gate_mlp.shape == (16,)


@pytest.mark.parametrize("dim", [96, 1024])
def test_gate_init_is_xavier_normal_on_one_by_d(dim):
    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(dim, 1, dim_feedforward=4, batch_first=True) for _ in range(1024 // dim + 1)]
    values = torch.cat([g.detach() for layer in layers for g in gate_parameters(inject_fsg(layer))]).numpy()
    std = math.sqrt(2.0 / (1 + dim))  # xavier: gain * sqrt(2 / (fan_in + fan_out)), fan_in = D, fan_out = 1
    assert abs(values.mean()) < 4 * std / math.sqrt(values.size)
    assert values.std() == pytest.approx(std, rel=0.08)
    # normal, not uniform: about 68.3 % within one std (a uniform of the same std gives 57.7 %)
    assert np.mean(np.abs(values) < std) == pytest.approx(0.683, abs=0.04)
    assert np.all(np.abs(torch.sigmoid(torch.from_numpy(values)).numpy() - 0.5) < 0.25)


def test_vit_with_fsg_keeps_the_backbone_weights_of_vit_b16():
    torch.manual_seed(0)
    vit = vit_b_16(weights=None, image_size=32)
    before = {name: p for name, p in vit.named_parameters()}
    values = {name: p.detach().clone() for name, p in before.items() if not name.startswith("heads")}
    gated = vit_with_fsg(vit, num_outputs=1)
    assert gated is vit
    after = dict(gated.named_parameters())
    for name, p in before.items():
        if not name.startswith("heads"):
            assert after[name] is p
            assert torch.equal(p, values[name])
    assert sum(isinstance(m, ViTBlock) and m.gate_attn is not None for m in gated.modules()) == 12
    assert not any(type(m) is EncoderBlock for m in gated.modules())
    assert gated.heads.head.out_features == 1 and gated.heads.head.in_features == 768
    with torch.no_grad():
        assert gated(torch.randn(2, 3, 32, 32)).shape == (2, 1)


def test_vit_with_fsg_keeps_the_head_without_num_outputs():
    vit = small_vit()
    head = vit.heads.head
    assert vit_with_fsg(vit).heads.head is head


def test_parameter_split_is_disjoint_and_complete():
    vit = vit_with_fsg(small_vit(layers=3))
    gates, rest = gate_parameters(vit), non_gate_parameters(vit)
    assert len(gates) == 2 * 3 and all(g.shape == (16,) for g in gates)
    gate_ids, rest_ids = {id(p) for p in gates}, {id(p) for p in rest}
    assert not gate_ids & rest_ids
    assert gate_ids | rest_ids == {id(p) for p in vit.parameters()}
    expected_gate_names = {f"encoder.layers.encoder_layer_{i}.gate_{b}" for i in range(3) for b in ("attn", "mlp")}
    assert {n for n, p in vit.named_parameters() if id(p) in gate_ids} == expected_gate_names


def test_gate_values_are_detached_sigmoids_in_layer_order():
    vit = vit_with_fsg(small_vit(layers=2))
    randomise_gates(vit)
    values = gate_values(vit)
    assert list(values) == ["attn_00", "mlp_00", "attn_01", "mlp_01"]
    for i in range(2):
        block = vit.encoder.layers[i]
        torch.testing.assert_close(values[f"attn_{i:02d}"], 1 / (1 + torch.exp(-block.gate_attn.detach())))
        torch.testing.assert_close(values[f"mlp_{i:02d}"], 1 / (1 + torch.exp(-block.gate_mlp.detach())))
    assert not any(v.requires_grad for v in values.values())


def test_gate_statistics_match_numpy():
    vit = vit_with_fsg(small_vit(layers=2))
    randomise_gates(vit, seed=3)
    stats = gate_statistics(vit, threshold=0.3)
    expected_keys = {
        f"gates/{b}/layer_{i:02d}/{s}" for b in ("attn", "mlp") for i in range(2) for s in ("mean", "std", "sparsity")
    } | {"gates/all/mean", "gates/all/sparsity"}
    assert set(stats) == expected_keys
    everything = []
    for i, block in enumerate(vit.encoder.layers):
        for branch in ("attn", "mlp"):
            raw = getattr(block, f"gate_{branch}").detach().numpy().astype(np.float64)
            v = 1 / (1 + np.exp(-raw))
            everything.append(v)
            prefix = f"gates/{branch}/layer_{i:02d}"
            assert stats[f"{prefix}/mean"] == pytest.approx(v.mean(), abs=1e-6)
            assert stats[f"{prefix}/std"] == pytest.approx(v.std(ddof=1), abs=1e-6)
            assert stats[f"{prefix}/sparsity"] == pytest.approx(np.mean(v < 0.3), abs=1e-9)
    allv = np.concatenate(everything)
    assert stats["gates/all/mean"] == pytest.approx(allv.mean(), abs=1e-6)
    assert stats["gates/all/sparsity"] == pytest.approx(np.mean(allv < 0.3), abs=1e-9)
    assert all(isinstance(v, float) for v in stats.values())


def test_gate_statistics_default_threshold_and_empty_model():
    vit = vit_with_fsg(small_vit(layers=1))
    with torch.no_grad():
        vit.encoder.layers[0].gate_attn[:4] = -5.0  # sigmoid(-5) = 0.0067 < 0.1
        vit.encoder.layers[0].gate_attn[4:] = 0.0
    assert gate_statistics(vit)["gates/attn/layer_00/sparsity"] == pytest.approx(4 / 16)
    assert gate_statistics(small_vit()) == {}


def test_fold_gates_gives_a_stock_vit_with_equal_outputs():
    gated = vit_with_fsg(small_vit(layers=3)).eval()
    randomise_gates(gated)
    state_before = {k: v.clone() for k, v in gated.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = gated(x)
    folded = fold_gates(gated)

    assert type(folded) is VisionTransformer
    assert all(type(m) is EncoderBlock for m in folded.encoder.layers)
    assert not any(isinstance(m, GATED) for m in folded.modules())
    assert not any("gate" in name for name, _ in folded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
    # the folded rows are the original rows times the gate, checked by hand for one layer
    s = torch.sigmoid(state_before["encoder.layers.encoder_layer_1.gate_mlp"])
    torch.testing.assert_close(
        folded.encoder.layers[1].mlp[3].weight, state_before["encoder.layers.encoder_layer_1.mlp.3.weight"] * s[:, None]
    )
    torch.testing.assert_close(
        folded.encoder.layers[1].self_attention.out_proj.bias,
        state_before["encoder.layers.encoder_layer_1.self_attention.out_proj.bias"]
        * torch.sigmoid(state_before["encoder.layers.encoder_layer_1.gate_attn"]),
    )
    # the input model is untouched
    for k, v in gated.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    assert all(isinstance(m, ViTBlock) and m.gate_attn is not None for m in gated.encoder.layers)


def test_folded_vit_exports_and_traces():
    gated = vit_with_fsg(small_vit(layers=2)).eval()
    randomise_gates(gated)
    folded = fold_gates(gated)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = folded(x)
        traced = torch.jit.trace(folded, x)
        torch.testing.assert_close(traced(x), expected, atol=1e-5, rtol=1e-5)
    exported = torch.export.export(folded, (x,))
    torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=1e-5)


def hand_transformer_layer(x, layer, pad, s_attn, s_mlp):
    """nn.TransformerEncoderLayer (relu, no dropout) with gates, written out."""

    def sa(h):
        return hand_attention(h, layer.self_attn, pad)

    def ff(h):
        return F.relu(h @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias

    if layer.norm_first:
        x = x + s_attn * sa(layer.norm1(x))
        return x + s_mlp * ff(layer.norm2(x))
    x = layer.norm1(x + s_attn * sa(x))
    return layer.norm2(x + s_mlp * ff(x))


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_inject_fsg_gates_a_torch_transformer_encoder(norm_first, grad_mode):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, num_layers=2)  # enable_nested_tensor defaults to True
    model = nn.ModuleDict({"encoder": encoder})
    assert inject_fsg(model) is model
    assert all(isinstance(m, GatedTransformerEncoderLayer) for m in encoder.layers)
    randomise_gates(model)
    model.eval()  # eval + no grad + padding mask is where PyTorch would take its fused fast path

    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 5:] = True
    with torch.set_grad_enabled(grad_mode):
        out = encoder(x, src_key_padding_mask=pad)
        expected = x
        for gated in encoder.layers:
            expected = hand_transformer_layer(
                expected, gated, pad, torch.sigmoid(gated.gate_attn), torch.sigmoid(gated.gate_mlp)
            )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_inject_fsg_is_idempotent():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2)
    model = nn.ModuleDict({"text": encoder, "vision": small_vit(layers=2)})
    inject_fsg(model)
    first = gate_parameters(model)
    assert len(first) == 2 * 4
    inject_fsg(model)
    second = gate_parameters(model)
    assert [id(g) for g in first] == [id(g) for g in second]
    assert sum(isinstance(m, GATED) for m in model.modules()) == 4


def test_inject_fsg_on_a_single_layer_returns_the_gated_layer():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    gated = inject_fsg(layer)
    assert isinstance(gated, GatedTransformerEncoderLayer) and gated.self_attn is layer.self_attn
    assert inject_fsg(gated) is gated


@pytest.mark.parametrize("norm_first", [True, False])
def test_fold_gates_on_a_torch_transformer_encoder(norm_first):
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=norm_first), num_layers=2
    )
    inject_fsg(encoder)
    randomise_gates(encoder)
    encoder.eval()
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=pad)
        folded = fold_gates(encoder)
        assert all(type(m) is nn.TransformerEncoderLayer for m in folded.layers)
        torch.testing.assert_close(folded(x, src_key_padding_mask=pad), expected, atol=1e-5, rtol=1e-5)


def test_fold_gates_does_not_touch_the_global_rng():
    gated = vit_with_fsg(small_vit(layers=2))
    state = torch.random.get_rng_state()
    fold_gates(gated)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_vit_with_fsg_rejects_other_models():
    with pytest.raises(TypeError):
        vit_with_fsg(nn.Linear(2, 2))
    vit = small_vit()
    vit.encoder.layers = nn.Sequential(nn.Identity())
    with pytest.raises(TypeError):
        vit_with_fsg(vit)
