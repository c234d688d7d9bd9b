"""The study's arms: identical starting weights across arms, frozen gates, released GR, gate shift from init."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.utils import set_determinism

from fsg_endo.engine.arms import ARMS as TABLE
from fsg_endo.engine.baselines import BASELINES
from fsg_endo.engine.distributed import SINGLE
from fsg_endo.engine.recipe import build_recipe
from fsg_endo.engine.schema import Config
from fsg_endo.experiment.analysis import gate_shift
from fsg_endo.experiment.config import load_config
from fsg_endo.experiment.runs import run_params
from fsg_endo.nn.gates import gate_logits, gate_parameters, gate_statistics, gate_values

ARMS = ("none", "dropout", "fsg", "fsg_frozen", "fsg_gr")


def recipe(regularizer: str, seed: int = 0):
    cfg = load_config("polyp_size_fsg", [f"regularizer={regularizer}", f"seed={seed}"], smoke=True)
    set_determinism(seed=seed)  # as fit does before building the recipe
    return build_recipe(cfg, SINGLE, steps_per_epoch=4)


def non_gate_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone and head: every tensor but the branch factors (gates, layer scales)."""
    return {k: v for k, v in model.state_dict().items() if not k.rsplit(".", 1)[-1].startswith(("gate_", "scale_"))}


def batch(r, n: int = 6):
    size = r.cfg.data.image_size
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(n, 3, size, size, generator=g), torch.randn(n, 4, generator=g))
    sizes = torch.linspace(2.0, 14.0, n)
    return inputs, r.task.targets({"size_mm": sizes})


def test_every_arm_of_a_seed_starts_from_the_same_backbone_and_head():
    states = {arm: non_gate_state(recipe(arm).model) for arm in ARMS}
    reference = states["none"]
    for arm, state in states.items():
        assert state.keys() == reference.keys(), arm
        for key, value in state.items():
            assert torch.equal(value, reference[key]), f"{arm}: {key} differs from none at step 0"
    other_seed = non_gate_state(recipe("none", seed=1).model)
    assert not all(torch.equal(other_seed[k], v) for k, v in reference.items())


def test_gated_arms_draw_the_same_gates_from_their_own_generator():
    gates = {arm: gate_logits(recipe(arm).model) for arm in ("fsg", "fsg_frozen", "fsg_gr", "fsg_gr_release")}
    first = gates["fsg"]
    assert all(torch.equal(g[k], first[k]) for g in gates.values() for k in first)
    assert not torch.equal(gate_logits(recipe("fsg", seed=1).model)["attn_00"], first["attn_00"])
    # the global RNG draws the backbone only: another global state, other backbone, the same gates
    cfg = load_config("polyp_size_fsg", ["regularizer=fsg"], smoke=True)
    set_determinism(seed=5)
    model = build_recipe(cfg, SINGLE, steps_per_epoch=4).model
    assert all(torch.equal(g, first[k]) for k, g in gate_logits(model).items())
    assert not torch.equal(
        non_gate_state(model)["vit.conv_proj.weight"], non_gate_state(recipe("fsg").model)["vit.conv_proj.weight"]
    )


def test_log_box_head_starts_at_the_training_median_of_size_per_box_side():
    cfg = load_config("polyp_size_fsg", ["model.size_head=log_box"], smoke=True)
    rows = pd.DataFrame(
        {
            "xmin": [10, 0, 30],
            "ymin": [20, 0, 10],
            "xmax": [50, 20, 110],
            "ymax": [40, 80, 50],
            "width": [200, 200, 160],
            "height": [100, 100, 120],
            "size_mm": [4.0, 9.0, 15.0],
        }
    )
    # by hand: log(size) - log(sqrt(w / W * h / H)) per row, then the median
    ratios = [
        np.log(4.0 / np.sqrt(40 / 200 * 20 / 100)),
        np.log(9.0 / np.sqrt(20 / 200 * 80 / 100)),
        np.log(15.0 / np.sqrt(80 / 160 * 40 / 120)),
    ]
    model = build_recipe(cfg, SINGLE, steps_per_epoch=4, train_rows=rows).model
    assert model.size_range == (0.5, 20.0)
    assert model.head[-1].bias.item() == pytest.approx(np.median(ratios), rel=1e-6)
    linear = load_config("polyp_size_fsg", ["model.size_head=linear"], smoke=True)
    assert build_recipe(linear, SINGLE, steps_per_epoch=4, train_rows=rows).model.size_range is None


def test_fsg_frozen_keeps_its_gates_and_trains_the_rest():
    r = recipe("fsg_frozen")
    gates = gate_parameters(r.model)
    assert gates and not any(g.requires_grad for g in gates)
    in_optimizers = {id(p) for o in r.optimizers.values() for group in o.param_groups for p in group["params"]}
    assert not in_optimizers & {id(g) for g in gates}
    before, init = non_gate_state(r.model), gate_logits(r.model)
    before = {k: v.clone() for k, v in before.items()}
    for _ in range(3):
        out = r.step(*batch(r))
        assert not out["skipped"]
    assert all(torch.equal(g, init[k]) for k, g in gate_logits(r.model).items())
    assert any(not torch.equal(v, before[k]) for k, v in non_gate_state(r.model).items())
    stats = gate_statistics(r.model, init=init)
    assert stats["gates/all/shift"] == 0.0 and stats["gates/all/shift_max"] == 0.0


def test_layerscale_starts_as_fsg_and_its_unbounded_scales_train_in_the_main_optimiser():
    r, fsg = recipe("layerscale"), recipe("fsg")
    scales = [p for n, p in r.model.named_parameters() if n.rsplit(".", 1)[-1].startswith("scale_")]
    assert scales and len(scales) == len(gate_parameters(fsg.model)) and not gate_parameters(r.model)
    for scale, gate in zip(scales, gate_parameters(fsg.model)):  # both in block order, attention branch first
        assert torch.equal(scale, torch.sigmoid(gate))
    r.model.eval(), fsg.model.eval()
    inputs, _ = batch(r)
    torch.testing.assert_close(r.model(*inputs), fsg.model(*inputs), rtol=0, atol=0)  # the same function at init
    assert set(r.optimizers) == {"main"}
    main = {id(p) for group in r.optimizers["main"].param_groups for p in group["params"]}
    assert all(id(s) in main for s in scales) and r.optimizers["main"].param_groups[0]["initial_lr"] == r.cfg.optim.lr
    before = [s.detach().clone() for s in scales]
    r.model.train()
    for _ in range(3):
        assert not r.step(*batch(r))["skipped"]
    assert all(not torch.equal(s, b) for s, b in zip(scales, before))


def test_fsg_gr_release_is_gradient_routing_with_accumulated_gate_pass():
    r = recipe("fsg_gr_release")
    assert r.gated and not recipe("fsg_gr").step.__self__.accumulate_gate_pass_grads
    assert set(r.optimizers) == {"main", "gate"}
    assert r.step.__self__.accumulate_gate_pass_grads


@pytest.mark.parametrize("arm", ["fsg", "fsg_gr"])
def test_learned_gates_move_and_the_shift_says_how_far(arm):
    r = recipe(arm)
    init = gate_logits(r.model)
    for group in [g for o in r.optimizers.values() for g in o.param_groups]:
        group["lr"] = 0.05  # a visible move in three steps
    for _ in range(3):
        r.step(*batch(r))
    stats = gate_statistics(r.model, init=init)
    now = gate_logits(r.model)
    moved = {k: (now[k] - init[k]).abs() for k in init}
    for key, diff in moved.items():
        branch, layer = key.split("_")
        assert stats[f"gates/{branch}/layer_{layer}/shift"] == pytest.approx(diff.mean().item(), rel=1e-5)
    every = torch.cat(list(moved.values()))
    assert stats["gates/all/shift"] == pytest.approx(every.mean().item(), rel=1e-5) and every.mean() > 0
    assert stats["gates/all/shift_max"] == pytest.approx(every.max().item(), rel=1e-5)
    assert "gates/all/shift" not in gate_statistics(r.model)  # without an init, no shift

    # the notebook's shift, from the stored sigmoid values, is the same number
    table = gate_shift(
        {3: {k: v.numpy() for k, v in gate_values(r.model).items()}},
        {k: torch.sigmoid(v).numpy() for k, v in init.items()},
    )
    row = table[(table["branch"] == "attn") & (table["layer"] == 0)].iloc[0]
    assert row["shift"] == pytest.approx(moved["attn_00"].mean().item(), rel=1e-3)
    assert row["init_std"] == pytest.approx(np.std(init["attn_00"].numpy(), ddof=1), rel=1e-3)


@pytest.mark.parametrize("arm", ["none", "fsg", "fsg_gr"])
def test_every_optimiser_takes_the_multi_tensor_step_and_it_equals_the_per_parameter_loop(arm):
    r = recipe(arm)
    loop = recipe(arm)  # same seed: the same weights
    for name, optimizer in r.optimizers.items():
        assert optimizer.defaults["foreach"] is True, name
        reference = loop.optimizers[name]
        reference.defaults["foreach"] = False
        for group in reference.param_groups:
            group["foreach"] = False
    for _ in range(3):
        inputs, targets = batch(r)
        r.step(inputs, targets)
        loop.step(inputs, targets)
    for (key, value), expected in zip(r.model.state_dict().items(), loop.model.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("arm", ["none", "fsg_gr"])
def test_decoupled_weight_decay_shrinks_the_weights_by_lr_times_decay_a_step(arm):
    """With no gradient, AdamW's decay multiplies a weight by 1 - lr * wd; Adam's L2 term, normalised by its own
    second moment, moves it by about lr whatever its size (what zeroed a pretraining's encoder at wd 0.05)."""
    keys = ["optim.weight_decay=0.05", "optim.lr=0.01"]
    for decoupled in (True, False):
        cfg = load_config("polyp_size_fsg", [f"regularizer={arm}", *keys, f"optim.decoupled_weight_decay={decoupled}"])
        r = build_recipe(cfg, SINGLE, steps_per_epoch=4)
        main = r.optimizers["main"]
        weight = next(p for p in main.param_groups[0]["params"] if p.dim() == 2)
        before = weight.detach().clone()
        weight.grad = torch.zeros_like(weight)
        main.step()
        lr = main.param_groups[0]["lr"]  # the schedule's first step
        if decoupled:
            torch.testing.assert_close(weight.detach(), before * (1 - lr * 0.05))
        else:
            l2 = 0.05 * before  # Adam's first step: lr * m_hat / (sqrt(v_hat) + eps), both of the L2 gradient
            torch.testing.assert_close(weight.detach(), before - lr * l2 / (l2.abs() + 1e-8))


def dropout_rates(model: torch.nn.Module) -> set[float]:
    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


@pytest.mark.parametrize("name", [name for name, arm in TABLE.items() if arm.trained])
def test_each_row_of_the_arm_table_is_what_the_recipe_builds(name):
    """The facts of a row, read back from the model and optimisers the recipe builds for that arm."""
    row, r = TABLE[name], recipe(name)
    gates = gate_parameters(r.model)
    assert bool(gates) == row.gated == r.gated
    assert (set(r.optimizers) == {"main", "gate"}) == row.routed
    assert (bool(gates) and not any(g.requires_grad for g in gates)) == row.frozen_gates
    routed_with_accumulation = row.routed and r.step.__self__.accumulate_gate_pass_grads
    assert routed_with_accumulation == row.accumulates_gate_pass
    assert (dropout_rates(r.model) - {0.0} != set()) == row.dropout
    params = run_params(r.cfg)
    assert (params["fsg.enabled"], params["gr.enabled"]) == (bool(gates), set(r.optimizers) == {"main", "gate"})


def test_the_config_choices_and_the_docs_name_every_arm_of_the_table():
    choices = typing.get_args(Config.model_fields["regularizer"].annotation)
    assert set(choices) == set(TABLE) and set(choices) == {a.name for a in TABLE.values()}
    docs = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    docs += "".join(p.read_text(encoding="utf-8") for p in (Path(__file__).parents[1] / "docs").glob("*.md"))
    assert not [name for name in TABLE if f"`{name}`" not in docs]


def test_a_classical_arm_names_a_baseline_and_trains_no_network():
    for name, row in TABLE.items():
        assert (row.baseline in BASELINES) == (not row.trained) == name.startswith("baseline_")
