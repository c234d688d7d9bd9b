"""``optim.compile``: torch.compile'd GR and plain steps give eager's losses; the recipe compiles on CUDA only.

Dynamo's capture of both GR passes (``torch.autograd.grad`` on the gates through a compiled module) is
checked with the ``aot_eager`` backend, which skips code generation (about 30 s on a loaded 2-core
machine, all of it Dynamo tracing; the plain-step twin is marked slow). The default Inductor backend
needs a C++ compile that takes minutes there, so that test is slow too.
"""

import pytest
import torch
from torch import nn

from fsg_endo.engine.recipe import compiled
from fsg_endo.experiment.config import load_config, revalidate
from fsg_endo.nn.gates import gate_parameters, non_gate_parameters
from fsg_endo.nn.models import build_model
from fsg_endo.nn.routing import GradientRouter, train_step

SMALL = {"image_size": 16, "patch_size": 8, "hidden_dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32}


def tiny(fsg: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(fsg=fsg, **SMALL)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head, which would zero the gate grads
    return model


def losses(backend: str | None, fsg: bool, steps: int = 3) -> list[float]:
    """Losses (both passes for GR) over a few steps, the model compiled with ``backend`` (None: eager)."""
    model = tiny(fsg)
    trained = model if backend is None else torch.compile(model, backend=backend)
    main = torch.optim.Adam(non_gate_parameters(model), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randn(4, 1, generator=gen)) for _ in range(steps)]
    if fsg:
        router = GradientRouter(
            trained, main, torch.optim.Adam(gate_parameters(model), lr=1e-1), nn.functional.mse_loss
        )
        results = [router.step(x, y) for x, y in batches]
        return [v for r in results for v in (r["gate_loss"], r["loss"])]
    return [train_step(trained, main, nn.functional.mse_loss, x, y)["loss"] for x, y in batches]


@pytest.mark.parametrize("fsg", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["gr", "plain"])
def test_compiled_steps_give_the_eager_losses(fsg):
    eager = losses(None, fsg)
    assert len(set(eager)) == len(eager)  # the steps change the model
    assert losses("aot_eager", fsg) == pytest.approx(eager, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_inductor_compiled_gr_steps_give_the_eager_losses():
    assert losses("inductor", True) == pytest.approx(losses(None, True), rel=1e-4, abs=1e-6)


def test_the_recipe_compiles_on_cuda_only():
    model = tiny(True)
    on = revalidate({"optim": {"compile": True}})
    assert compiled(on, model, torch.device("cpu")) is model
    assert compiled(revalidate({"optim": {"compile": False}}), model, torch.device("cuda")) is model
    wrapped = compiled(on, model, torch.device("cuda"))  # lazy: nothing is compiled before the first call
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and wrapped._orig_mod is model
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in model.parameters()}


def test_compile_is_off_by_default_and_on_in_the_paper_profile():
    assert load_config("polyp_size_fsg").optim.compile is False
    assert load_config("polyp_size_fsg", profile="paper").optim.compile is True
