"""Model factory: presets, the sizing wrapper (with gates, routing, folding), stochastic depth, local weights."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from fsg_endo.data.sizes import scale_size, unscale_size
from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.block import ViTBlock
from fsg_endo.nn.gates import fold_gates, gate_parameters, non_gate_parameters
from fsg_endo.nn.models import VIT_PRESETS, SizingModel, build_model, load_local_weights
from fsg_endo.nn.routing import GradientRouter

SMALL = {"hidden_dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32}


def block_sizes(vit: VisionTransformer) -> tuple[int, int, int, int]:
    first = vit.encoder.layers[0]
    return (vit.hidden_dim, len(vit.encoder.layers), first.self_attention.num_heads, first.mlp[0].out_features)


@pytest.mark.parametrize(
    "preset, expected", [("micro", (128, 4, 4, 512)), ("ti", (192, 12, 3, 768)), ("s", (384, 12, 6, 1536))]
)
def test_presets_build_the_named_sizes(preset, expected):
    assert tuple(VIT_PRESETS[preset][k] for k in ("hidden_dim", "depth", "heads", "mlp_dim")) == expected
    vit = build_model(preset, image_size=32, patch_size=16)
    assert type(vit) is VisionTransformer and block_sizes(vit) == expected


def test_explicit_sizes_override_the_preset_and_set_the_head():
    vit = build_model("b", image_size=32, patch_size=8, num_outputs=3, **SMALL)
    assert block_sizes(vit) == (16, 2, 2, 32)
    assert vit.heads.head.out_features == 3 and vit(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_bad_model_settings_are_user_errors():
    with pytest.raises(FsgEndoError, match="preset"):
        build_model("huge")
    with pytest.raises(FsgEndoError, match="patch_size"):
        build_model(image_size=30, patch_size=8, **SMALL)
    with pytest.raises(FsgEndoError, match="stochastic_depth"):
        build_model(fsg=True, stochastic_depth=0.1, **SMALL)


def sizing_model(seed: int = 0, fsg: bool = True) -> SizingModel:
    torch.manual_seed(seed)
    return build_model(image_size=16, patch_size=8, num_outputs=1, fsg=fsg, box_features=4, **SMALL)


def test_sizing_model_joins_class_token_features_and_box():
    model = sizing_model().eval()
    assert isinstance(model.vit, VisionTransformer) and isinstance(model.vit.heads, nn.Identity)
    x, box = torch.randn(3, 3, 16, 16), torch.randn(3, 4)
    with torch.no_grad():
        out = model(x, box)
        # by hand: class token through the encoder, joined with the box, through the head
        vit = model.vit
        tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.class_token.expand(3, -1, -1), tokens], dim=1)
        features = vit.encoder(tokens)[:, 0]
        expected = model.head(torch.cat([features, box], dim=1))
        other_box = model(x, box + 1.0)
    assert out.shape == (3, 1)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, other_box)


def test_gates_routing_and_folding_work_on_the_sizing_model():
    model = sizing_model()
    assert sum(isinstance(m, ViTBlock) and m.gate_attn is not None for m in model.modules()) == 2
    gates = gate_parameters(model)
    assert len(gates) == 4
    assert {id(p) for p in gates} | {id(p) for p in non_gate_parameters(model)} == {id(p) for p in model.parameters()}
    head_before = model.head[0].weight.detach().clone()
    gates_before = [g.detach().clone() for g in gates]
    router = GradientRouter(
        model,
        torch.optim.Adam(non_gate_parameters(model), lr=1e-2),
        torch.optim.Adam(gates, lr=1e-2),
        lambda out, t: ((out - t) ** 2).mean(),
    )
    x, box, y = torch.randn(4, 3, 16, 16), torch.randn(4, 4), torch.randn(4, 1)
    result = router.step((x, box), y)
    assert result["skipped"] is False
    assert all(not torch.equal(g, g0) for g, g0 in zip(gates, gates_before))
    assert not torch.equal(model.head[0].weight, head_before)

    model.eval()
    folded = fold_gates(model)
    assert type(folded) is SizingModel and type(folded.vit) is VisionTransformer
    assert all(type(m) is EncoderBlock for m in folded.vit.encoder.layers)
    assert not gate_parameters(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, box), model(x, box), atol=1e-5, rtol=1e-5)
    assert gate_parameters(model)  # the input keeps its gates


def test_log_box_head_scales_the_box_side_by_exp_of_the_head():
    torch.manual_seed(0)
    model = build_model(
        image_size=16, patch_size=8, num_outputs=1, fsg=True, box_features=4, size_range=(0.5, 20.0), **SMALL
    ).eval()
    x = torch.randn(3, 3, 16, 16)
    box = torch.tensor([[-2.0, -2.2, 0.5, 0.5], [-1.0, -1.4, 0.3, 0.6], [-3.0, -2.6, 0.7, 0.4]])
    with torch.no_grad():
        head = model.head(torch.cat([model.vit(x), box], dim=1)).reshape(-1).numpy()
        out = model(x, box).reshape(-1).numpy()
    # by hand, in numpy: size = exp(head) x sqrt(w_rel * h_rel), then the documented linear [0.5, 20] -> [-1, 1]
    side = np.sqrt(np.exp(box[:, 0].numpy()) * np.exp(box[:, 1].numpy()))
    np.testing.assert_allclose(out, scale_size(np.exp(head) * side), rtol=1e-5, atol=1e-6)

    model.head[-1].weight.data.zero_()
    model.init_log_ratio(math.log(40.0))  # the head now says "40 box sides", whatever the crop
    with torch.no_grad():
        np.testing.assert_allclose(unscale_size(model(x, box).reshape(-1).numpy()), 40.0 * side, rtol=1e-5)
    folded = fold_gates(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, box), model(x, box), atol=1e-5, rtol=1e-5)


def test_log_box_head_needs_one_output_and_the_box():
    vit = build_model(image_size=16, patch_size=8, **SMALL)
    with pytest.raises(ValueError, match="size_range"):
        SizingModel(vit, box_features=4, num_outputs=3, size_range=(0.5, 20.0))


def test_stochastic_depth_rises_linearly_and_is_identity_in_eval():
    torch.manual_seed(0)
    plain = build_model(image_size=16, patch_size=8, hidden_dim=16, depth=5, heads=2, mlp_dim=32)
    torch.manual_seed(0)
    regularised = build_model(
        image_size=16, patch_size=8, hidden_dim=16, depth=5, heads=2, mlp_dim=32, stochastic_depth=0.2
    )
    blocks = list(regularised.encoder.layers)
    assert all(isinstance(b, ViTBlock) for b in blocks)
    assert [b.drop_path.p for b in blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert blocks[0].mlp is regularised.encoder.layers[0].mlp
    x = torch.randn(2, 3, 16, 16)
    nn.init.normal_(plain.heads.head.weight)
    regularised.heads.head.weight.data.copy_(plain.heads.head.weight)
    with torch.no_grad():
        torch.testing.assert_close(regularised.eval()(x), plain.eval()(x))


def test_stochastic_depth_drops_whole_branches_in_training():
    torch.manual_seed(0)
    block = EncoderBlock(2, 16, 32, 0.0, 0.0)
    x = torch.randn(64, 5, 16)
    with torch.no_grad():
        kept = ViTBlock.from_block(block, drop_path=0.0).train()(x)
        torch.testing.assert_close(kept, block(x))
        torch.testing.assert_close(ViTBlock.from_block(block, drop_path=1.0).train()(x), x)
        out = ViTBlock.from_block(block, drop_path=0.5).train()(x)
    # per sample, each branch is either dropped or kept (rescaled); the attention branch alone
    # decides whether the sample differs from the input at all
    changed = (out - x).abs().flatten(1).amax(1) > 0
    assert 0 < int(changed.sum()) < 64


def timm_layout(vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """A timm ViT checkpoint made from a torchvision model by the inverse key mapping."""
    renames = [
        (r"^class_token$", "cls_token"),
        (r"^encoder\.pos_embedding$", "pos_embed"),
        (r"^conv_proj\.", "patch_embed.proj."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
        (r"^encoder\.ln\.", "norm."),
        (r"^heads\.head\.", "head."),
    ]
    out = {}
    for key, value in vit.state_dict().items():
        for pattern, replacement in renames:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        out[key] = value.clone()
    assert not any(k.startswith("encoder") for k in out)
    return out


def source_vit(image_size: int = 16, num_outputs: int = 2) -> VisionTransformer:
    torch.manual_seed(7)
    vit = build_model(image_size=image_size, patch_size=8, num_outputs=num_outputs, **SMALL)
    nn.init.normal_(vit.heads.head.weight)
    with torch.no_grad():
        vit.encoder.pos_embedding.normal_()
    return vit.eval()


@pytest.mark.parametrize("layout", ["torchvision", "timm", "timm_in_model_key", "torchvision_in_state_dict_key"])
def test_local_weights_reproduce_the_source_model(tmp_path, layout):
    source = source_vit()
    state = timm_layout(source) if layout.startswith("timm") else source.state_dict()
    if layout == "timm_in_model_key":
        state = {"model": state, "epoch": 3}
    if layout == "torchvision_in_state_dict_key":
        state = {"state_dict": state}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    torch.manual_seed(99)
    target = build_model(image_size=16, patch_size=8, num_outputs=2, weights=path, **SMALL).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))


def test_weights_are_loaded_before_gating(tmp_path):
    source = source_vit()
    path = tmp_path / "w.pt"
    torch.save(timm_layout(source), path)
    gated = build_model(image_size=16, patch_size=8, num_outputs=2, weights=path, fsg=True, **SMALL)
    assert gate_parameters(gated)
    own = gated.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(own[key], value), key


def test_position_embeddings_are_interpolated_to_the_new_grid(tmp_path):
    source = source_vit(image_size=16)  # 2x2 patch grid
    grid = torch.arange(2.0).repeat_interleave(2).reshape(1, 4, 1).expand(1, 4, 16)  # value = row index
    with torch.no_grad():
        source.encoder.pos_embedding[:, 1:] = grid
    path = tmp_path / "w.pt"
    torch.save(timm_layout(source), path)
    target = build_model(image_size=48, patch_size=8, num_outputs=2, **SMALL)  # 6x6 patch grid
    report = load_local_weights(target, path)
    pos = target.encoder.pos_embedding.detach()
    assert pos.shape == (1, 1 + 36, 16)
    assert "encoder.pos_embedding" in report.loaded
    torch.testing.assert_close(pos[:, 0], source.encoder.pos_embedding[:, 0].detach())  # class token kept
    rows = pos[0, 1:, 0].reshape(6, 6)
    torch.testing.assert_close(rows, rows[:, :1].expand(6, 6))  # constant along each row
    assert torch.all(rows[1:, 0] >= rows[:-1, 0]) and rows[0, 0] == pytest.approx(0) and rows[-1, 0] == pytest.approx(1)
    expected = F.interpolate(grid[0, :, 0].reshape(1, 1, 2, 2), size=(6, 6), mode="bicubic", align_corners=True)
    torch.testing.assert_close(rows, expected[0, 0])


def test_a_head_of_another_shape_is_skipped_and_reported(tmp_path):
    source = source_vit(num_outputs=5)
    path = tmp_path / "w.pt"
    torch.save(timm_layout(source), path)
    target = build_model(image_size=16, patch_size=8, num_outputs=1, **SMALL)
    head = target.heads.head.weight.detach().clone()
    report = load_local_weights(target, path)
    assert set(report.skipped) == {"heads.head.weight", "heads.head.bias"}
    assert torch.equal(target.heads.head.weight, head)
    assert torch.equal(target.encoder.ln.weight, source.encoder.ln.weight)
    assert set(report.missing) == {"heads.head.weight", "heads.head.bias"}  # the new head keeps its init
    assert len(report.loaded) == len(target.state_dict()) - 2


def test_loading_into_a_sizing_model_targets_its_vit(tmp_path):
    source = source_vit()
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    model = sizing_model(fsg=False)
    report = load_local_weights(model, path)
    assert torch.equal(model.vit.conv_proj.weight, source.conv_proj.weight)
    assert set(report.skipped) == {"heads.head.weight", "heads.head.bias"}


def test_bad_weight_files_are_user_errors_naming_the_file(tmp_path):
    model = build_model(image_size=16, patch_size=8, **SMALL)
    cases = {
        "missing.pt": None,
        "text.pt": "not a checkpoint",
        "other.pt": {"fc.weight": torch.zeros(2, 2)},
        "wide.pt": build_model(image_size=16, patch_size=8, hidden_dim=32, depth=2, heads=2, mlp_dim=32).state_dict(),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(FsgEndoError) as err:
            load_local_weights(model, path)
        message = str(err.value)
        assert name in message and "\n" not in message
