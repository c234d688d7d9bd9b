"""Checkpoints of the paper's released FSG ViT (timm names, gates as fsag_rgb_ls1/2) in, and ours back out.

The release checkpoint is built here from its documented layout, and its model is a small timm-math
forward written out below from that state dict alone: no release code is involved.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fsg_endo.engine.recipe import build_for
from fsg_endo.engine.tasks import get_task
from fsg_endo.experiment.config import load_config
from fsg_endo.nn.gates import gate_values
from fsg_endo.nn.models import build_model
from fsg_endo.nn.weights import load_local_weights, read_state_dict, to_release_state_dict

DIM, DEPTH, HEADS, MLP, PATCH, IMAGE, OUTPUTS = 32, 2, 2, 64, 8, 32, 1
SIZE = {"hidden_dim": DIM, "depth": DEPTH, "heads": HEADS, "mlp_dim": MLP}


def release_vit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict of the release's timm FSG ViT (class-token pooling, Linear head on ``norm``)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    tokens = (IMAGE // PATCH) ** 2 + 1
    state = {
        "cls_token": rand(1, 1, DIM),
        "pos_embed": rand(1, tokens, DIM),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rand(DIM),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state.update(
            {
                b + "norm1.weight": 1 + rand(DIM),
                b + "norm1.bias": rand(DIM),
                b + "attn.qkv.weight": rand(3 * DIM, DIM),
                b + "attn.qkv.bias": rand(3 * DIM),
                b + "attn.proj.weight": rand(DIM, DIM),
                b + "attn.proj.bias": rand(DIM),
                b + "fsag_rgb_ls1": rand(DIM, scale=2.0),
                b + "norm2.weight": 1 + rand(DIM),
                b + "norm2.bias": rand(DIM),
                b + "mlp.fc1.weight": rand(MLP, DIM),
                b + "mlp.fc1.bias": rand(MLP),
                b + "mlp.fc2.weight": rand(DIM, MLP),
                b + "mlp.fc2.bias": rand(DIM),
                b + "fsag_rgb_ls2": rand(DIM, scale=2.0),
            }
        )
    state.update(
        {
            "norm.weight": 1 + rand(DIM),
            "norm.bias": rand(DIM),
            "head.weight": rand(OUTPUTS, DIM),
            "head.bias": rand(OUTPUTS),
        }
    )
    return state


def release_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """The release trainer's file: the wrapper's state dict (ViT under ``model.``) plus optimiser state."""
    return {
        "epoch": 12,
        "model_state_dict": {"model." + k: v for k, v in state.items()},
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 5e-5}]},
    }


def release_forward(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """timm's FSG ViT from the state dict: pre-norm blocks, x + sigmoid(g) * branch, eps 1e-6, exact GELU."""

    def ln(t, name):
        return F.layer_norm(t, (DIM,), s[name + ".weight"], s[name + ".bias"], eps=1e-6)

    def linear(t, name):
        return t @ s[name + ".weight"].T + s[name + ".bias"]

    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(len(x), -1, -1), t], dim=1) + s["pos_embed"]
    b, n, _ = t.shape
    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv = linear(ln(t, p + "norm1"), p + "attn.qkv").reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS)).softmax(-1)
        y = linear((attn @ v).transpose(1, 2).reshape(b, n, DIM), p + "attn.proj")
        t = t + y * torch.sigmoid(s[p + "fsag_rgb_ls1"])
        y = linear(F.gelu(linear(ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        t = t + y * torch.sigmoid(s[p + "fsag_rgb_ls2"])
    return linear(ln(t, "norm")[:, 0], "head").squeeze(-1)  # the release squeezes a 1-output head


@pytest.fixture
def release_file(tmp_path):
    state = release_vit_state()
    path = tmp_path / "epoch-12_trainset_checkpoint.pth"
    torch.save(release_checkpoint(state), path)
    return state, path


def test_a_release_checkpoint_reproduces_the_release_model(release_file):
    state, path = release_file
    torch.manual_seed(3)
    model = build_model(image_size=IMAGE, patch_size=PATCH, num_outputs=OUTPUTS, fsg=True, weights=path, **SIZE).eval()
    x = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x).squeeze(-1), release_forward(state, x)
    assert theirs.abs().min() > 1e-3  # a non-degenerate output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gate_values(model)["mlp_01"], torch.sigmoid(state["blocks.1.fsag_rgb_ls2"]))


def test_the_load_report_names_loaded_mapped_and_skipped_keys(release_file):
    state, path = release_file
    gated = build_model(image_size=IMAGE, patch_size=PATCH, num_outputs=OUTPUTS, fsg=True, **SIZE)
    report = load_local_weights(gated, path)
    assert report.mapped["blocks.0.fsag_rgb_ls1"] == "encoder.layers.encoder_layer_0.gate_attn"
    assert report.mapped["blocks.1.fsag_rgb_ls2"] == "encoder.layers.encoder_layer_1.gate_mlp"
    assert report.mapped["blocks.1.attn.qkv.weight"] == "encoder.layers.encoder_layer_1.self_attention.in_proj_weight"
    assert set(report.mapped) == set(state)  # every release name is renamed
    assert sorted(report.loaded) == sorted(gated.state_dict()) and not report.missing
    assert not report.skipped and not report.unexpected

    new_head = build_model(image_size=IMAGE, patch_size=PATCH, num_outputs=3, fsg=True, **SIZE)
    assert set(load_local_weights(new_head, path).skipped) == {"heads.head.weight", "heads.head.bias"}
    plain = build_model(image_size=IMAGE, patch_size=PATCH, num_outputs=OUTPUTS, **SIZE)
    gates = {f"encoder.layers.encoder_layer_{i}.gate_{b}" for i in range(DEPTH) for b in ("attn", "mlp")}
    assert set(load_local_weights(plain, path).unexpected) == gates  # a plain arm has nowhere to put them


def test_ours_written_back_in_the_release_layout_round_trips(release_file, tmp_path):
    state, path = release_file
    model = build_model(image_size=IMAGE, patch_size=PATCH, num_outputs=OUTPUTS, fsg=True, weights=path, **SIZE)
    written = to_release_state_dict(model)
    assert set(written) == {"model." + k for k in state}
    for key, value in state.items():
        assert torch.equal(written["model." + key], value), key  # bit-exact round trip
    out = tmp_path / "ours_as_release.pth"
    torch.save({"model_state_dict": written}, out)
    assert read_state_dict(out).keys() == state.keys()
    with pytest.raises(ValueError, match="gated"):
        to_release_state_dict(build_model(image_size=IMAGE, patch_size=PATCH, **SIZE))


def test_model_weights_in_an_fsg_config_load_the_release_gates(release_file):
    state, path = release_file
    overrides = [
        f"model.weights={path}",
        "regularizer=fsg_gr",
        "model.box_features=false",
        "model.size_head=linear",
        f"data.image_size={IMAGE}",
        f"model.patch_size={PATCH}",
        f"model.hidden_dim={DIM}",
        f"model.depth={DEPTH}",
        f"model.heads={HEADS}",
        f"model.mlp_dim={MLP}",
    ]
    cfg = load_config("polyp_size_fsg", overrides, smoke=True)
    task = get_task(cfg.task, cfg.loss.main_weights, cfg.loss.gate_weights)
    model = build_for(cfg, task).eval()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model(x).squeeze(-1), release_forward(state, x), atol=1e-5, rtol=1e-5)
