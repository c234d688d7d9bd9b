"""Gradient Routing and the plain step, checked against the two passes replicated by hand (plain SGD)."""

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from fsg_endo.nn.gates import gate_parameters, non_gate_parameters, vit_with_fsg
from fsg_endo.nn.routing import GradientRouter, train_step

LR_MAIN, LR_GATE = 0.05, 0.5


def gated_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=1
    )
    nn.init.normal_(vit.heads.head.weight, std=0.5)
    return vit_with_fsg(vit)


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 16, 16, generator=gen), torch.randn(6, 1, generator=gen)


def main_loss(out, target):
    return ((out - target) ** 2).mean()


def gate_loss(out, target):
    return (3.0 * (out - target).abs()).mean()


def router_for(model, accumulate=False, main_clip=10.0, gate_clip=32.0, **kw):
    return GradientRouter(
        model,
        torch.optim.SGD(non_gate_parameters(model), lr=LR_MAIN),
        torch.optim.SGD(gate_parameters(model), lr=LR_GATE),
        main_loss,
        gate_loss,
        main_clip=main_clip,
        gate_clip=gate_clip,
        accumulate_gate_pass_grads=accumulate,
        **kw,
    )


def clipped(grads, max_norm):
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * coef for g in grads]


def hand_gr_step(model, x, y, accumulate, main_clip, gate_clip):
    """The two GR passes written out with autograd and SGD updates (independent of the router)."""
    gates = gate_parameters(model)
    backbone = non_gate_parameters(model)
    every = gates + backbone
    grads = torch.autograd.grad(gate_loss(model(x), y), every)
    gate_grads, carried = grads[: len(gates)], grads[len(gates) :]
    with torch.no_grad():
        for p, g in zip(gates, clipped(gate_grads, gate_clip)):
            p -= LR_GATE * g
    main_grads = torch.autograd.grad(main_loss(model(x), y), backbone)
    if accumulate:
        main_grads = [a + b for a, b in zip(main_grads, carried)]
    with torch.no_grad():
        for p, g in zip(backbone, clipped(main_grads, main_clip)):
            p -= LR_MAIN * g


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("clips", [(10.0, 32.0), (0.05, 0.01)])
def test_router_step_equals_the_two_passes_by_hand(accumulate, clips):
    model = gated_vit()
    reference = copy.deepcopy(model)
    x, y = batch()
    result = router_for(model, accumulate, *clips).step(x, y)
    hand_gr_step(reference, x, y, accumulate, *clips)
    expected = params_of(reference)
    for name, value in params_of(model).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert set(result) >= {"loss", "gate_loss", "skipped"}
    assert isinstance(result["loss"], float) and isinstance(result["gate_loss"], float)
    assert result["skipped"] is False
    with torch.no_grad():
        assert result["gate_loss"] == pytest.approx(float(gate_loss(gated_vit()(x), y)), rel=1e-5)


def test_accumulating_the_gate_pass_changes_the_backbone_update():
    x, y = batch()
    isolated, accumulated = gated_vit(), gated_vit()
    router_for(isolated, accumulate=False).step(x, y)
    router_for(accumulated, accumulate=True).step(x, y)
    a, b = params_of(isolated), params_of(accumulated)
    for name in a:
        if "gate" in name:
            torch.testing.assert_close(a[name], b[name])  # the gate pass is the same either way
    assert any(not torch.allclose(a[n], b[n]) for n in a if "gate" not in n)


def test_gate_pass_changes_only_gates_and_computes_no_backbone_weight_grads():
    model = gated_vit()
    router = router_for(model)
    start = params_of(model)
    backbone = non_gate_parameters(model)
    grads_computed = []
    for p in backbone:
        p.register_hook(lambda g: grads_computed.append(1))
    seen = {}

    def before_gate_step(optimizer, args, kwargs):
        seen["backbone_grads"] = [p.grad for p in backbone]
        seen["weight_grads_computed"] = len(grads_computed)
        seen["params"] = params_of(model)

    router.gate_optimizer.register_step_pre_hook(before_gate_step)
    x, y = batch()
    router.step(x, y)
    assert seen["weight_grads_computed"] == 0
    assert all(g is None for g in seen["backbone_grads"])
    assert all(torch.equal(seen["params"][n], start[n]) for n in start)
    assert len(grads_computed) == len(backbone)  # the main pass does compute them
    after = params_of(model)
    assert all(not torch.equal(after[n], start[n]) for n in start)
    assert all(p.grad is None for p in model.parameters())


def test_main_pass_leaves_the_gates_alone():
    model = gated_vit()
    router = router_for(model)
    gates_after_gate_step = {}

    def after_gate_step(optimizer, args, kwargs):
        gates_after_gate_step.update({id(g): g.detach().clone() for g in gate_parameters(model)})

    router.gate_optimizer.register_step_post_hook(after_gate_step)
    router.step(*batch())
    for g in gate_parameters(model):
        assert torch.equal(g, gates_after_gate_step[id(g)])


def test_gate_loss_defaults_to_main_loss():
    x, y = batch()
    model = gated_vit()
    router = GradientRouter(
        model,
        torch.optim.SGD(non_gate_parameters(model), lr=LR_MAIN),
        torch.optim.SGD(gate_parameters(model), lr=LR_GATE),
        main_loss,
    )
    with torch.no_grad():
        expected = float(main_loss(model(x), y))
    assert router.step(x, y)["gate_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_non_finite_steps_are_skipped(bad):
    def nan_loss(out, target):
        return main_loss(out, target) * float("nan")

    def inf_grad_loss(out, target):  # finite value (0), infinite gradient: d sqrt(u)/du at u = 0
        return torch.sqrt((out - out.detach()).abs()).sum()

    loss = nan_loss if bad == "nan_loss" else inf_grad_loss
    model = gated_vit()
    start = params_of(model)
    router = GradientRouter(
        model,
        torch.optim.SGD(non_gate_parameters(model), lr=LR_MAIN),
        torch.optim.SGD(gate_parameters(model), lr=LR_GATE),
        loss,
    )
    result = router.step(*batch())
    assert result["skipped"] is True
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    plain = train_step(model, torch.optim.SGD(model.parameters(), lr=LR_MAIN), loss, *batch())
    assert plain["skipped"] is True
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_a_bad_gate_pass_is_dropped_and_the_main_pass_still_runs(bad):
    def gate_nan(out, target):
        return main_loss(out, target) * float("nan")

    def gate_inf_grad(out, target):
        return torch.sqrt((out - out.detach()).abs()).sum()

    model, reference = gated_vit(), gated_vit()
    start = params_of(model)
    router = GradientRouter(
        model,
        torch.optim.SGD(non_gate_parameters(model), lr=LR_MAIN),
        torch.optim.SGD(gate_parameters(model), lr=LR_GATE),
        main_loss,
        gate_nan if bad == "nan_loss" else gate_inf_grad,
        accumulate_gate_pass_grads=True,
    )
    result = router.step(*batch())
    assert result["skipped"] is True
    # no gate-pass gradient reaches the main step: the backbone moves as by the main loss alone
    train_step(reference, torch.optim.SGD(non_gate_parameters(reference), lr=LR_MAIN), main_loss, *batch())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
        assert torch.equal(p, start[name]) == ("gate" in name), name


@pytest.mark.parametrize("clip", [0.1, None])
def test_train_step_equals_one_sgd_step_by_hand(clip):
    model, reference = gated_vit(), gated_vit()
    x, y = batch()
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=LR_MAIN), main_loss, x, y, clip=clip)
    params = list(reference.parameters())
    grads = torch.autograd.grad(main_loss(reference(x), y), params)
    with torch.no_grad():
        for p, g in zip(params, grads if clip is None else clipped(grads, clip)):
            p -= LR_MAIN * g
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert result["skipped"] is False
    assert result["grad_norm"] == pytest.approx(float(torch.sqrt(sum((g**2).sum() for g in grads))), rel=1e-4)


def test_tuple_inputs_are_unpacked_into_the_model():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = gated_vit()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x, z):
            return self.vit(x) + self.scale * z

    model = TwoInputs()
    x, y = batch()
    z = torch.randn(6, 1)
    result = router_for(model).step((x, z), y)
    assert math.isfinite(result["loss"]) and result["skipped"] is False
    assert model.scale.item() != 1.0


def test_amp_is_ignored_on_cpu():
    x, y = batch()
    plain, amp = gated_vit(), gated_vit()
    router_for(plain).step(x, y)
    router_for(amp, amp=True).step(x, y)
    for (name, p), q in zip(plain.named_parameters(), amp.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_runs_the_forward_in_bfloat16_on_cuda():
    model = gated_vit().cuda()
    dtypes = []
    model.heads.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    start = params_of(model)
    x, y = (t.cuda() for t in batch())
    result = router_for(model, amp=True).step(x, y)
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert result["skipped"] is False and math.isfinite(result["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_router_rejects_shared_or_empty_gate_parameters():
    model = gated_vit()
    everything = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError):
        GradientRouter(model, everything, torch.optim.SGD(gate_parameters(model), lr=0.1), main_loss)
    frozen = nn.Parameter(torch.zeros(1), requires_grad=False)
    with pytest.raises(ValueError):
        GradientRouter(
            model, torch.optim.SGD(non_gate_parameters(model), lr=0.1), torch.optim.SGD([frozen], lr=0.1), main_loss
        )
