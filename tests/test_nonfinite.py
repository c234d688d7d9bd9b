"""Non-finite guard: a NaN/Inf loss or gradient skips its step and is counted; too many stop the run as FAILED."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures_runs import histories, in_process, only_run

import fsg_endo.engine.train as train
from fsg_endo.engine.checkpoint import load_checkpoint
from fsg_endo.engine.tasks import RegressionTask

ARGS = ["--exp", "polyp_size_fsg", "--smoke", "--set", "tracking.log_model=false", "--set", "tracking.plots=false"]


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def inject(monkeypatch, nan_image_steps: set[int], inf_grad_steps: set[int]) -> None:
    """A NaN pixel in the batch of the given optimiser steps (a corrupt item: both GR passes see a NaN loss),
    and an infinite gradient in the main pass of others (its loss stays finite)."""
    build, main_loss, steps = train.build_recipe, RegressionTask.main_loss, [0]

    def build_corrupting(*args, **kwargs):
        recipe = build(*args, **kwargs)
        inner = recipe.step

        def corrupting_step(inputs, targets):
            steps[0] += 1
            if steps[0] in nan_image_steps:
                image, box = inputs
                image = image.clone()
                image[0, 0, 0, 0] = math.nan
                inputs = (image, box)
            return inner(inputs, targets)

        recipe.step = corrupting_step
        return recipe

    def overflowing_loss(self, outputs, targets):
        return main_loss(self, InfGrad.apply(outputs) if steps[0] in inf_grad_steps else outputs, targets)

    monkeypatch.setattr(train, "build_recipe", build_corrupting)
    monkeypatch.setattr(RegressionTask, "main_loss", overflowing_loss)


def test_skipped_steps_are_counted_and_never_trained_on(tmp_path, data_cache, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    inject(monkeypatch, nan_image_steps={2}, inf_grad_steps={4})
    assert in_process([*ARGS, "--set", "optim.max_skipped_steps=2"], tmp_path, data_cache, uri) == 0
    client, run = only_run(uri)
    assert run.info.status == "FINISHED"
    history = histories(client, run)
    assert history["train/skipped_steps"][-1][1] == 2
    logged = [s for s, _ in history["train/loss"]]
    assert 2 not in logged and 4 not in logged and {1, 3, 5} <= set(logged)  # skipped steps log no loss
    assert all(math.isfinite(v) for _, v in history["train/loss"] + history["test/mae"] + history["val/mae"])
    (last,) = tmp_path.glob("runs/*/last.pt")
    state = load_checkpoint(last)
    assert state["progress"]["skipped"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_too_many_non_finite_steps_fail_the_run_in_one_line(tmp_path, data_cache, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    inject(monkeypatch, nan_image_steps=set(range(1, 100)), inf_grad_steps=set())
    assert in_process([*ARGS, "--set", "optim.max_skipped_steps=1"], tmp_path, data_cache, uri) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fsg-endo:")]  # besides progress bars
    assert len(lines) == 1 and "Traceback" not in err
    assert "optim.max_skipped_steps = 1" in lines[0] and "non-finite" in lines[0] and "step 2" in lines[0]
    _, run = only_run(uri)
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("value", ["-1", "two"])
def test_max_skipped_steps_is_validated(tmp_path, data_cache, capsys, value):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert in_process([*ARGS, "--set", f"optim.max_skipped_steps={value}"], tmp_path, data_cache, uri) == 2
    assert "optim.max_skipped_steps" in capsys.readouterr().err
