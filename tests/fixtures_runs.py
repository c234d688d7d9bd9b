"""Helpers for tests of whole training runs: run in-process, read a run's metric histories back, compare them."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from fsg_endo import cli

EPOCHS = 3
# 3 epochs of several steps (8 frames per lesion, batch 8), no model or plots: room to interrupt inside an epoch
RUN_ARGS = [
    "--exp",
    "polyp_size_fsg",
    "--smoke",
    "--set",
    f"optim.epochs={EPOCHS}",
    "--set",
    "data.frames_per_lesion=8",
    "--set",
    "tracking.log_model=false",
    "--set",
    "tracking.plots=false",
]


def in_process(args: list[str], cwd: Path, cache: Path, uri: str) -> int:
    """``fsg-endo run ARGS`` in this process (faster than a subprocess; same numerics); returns the exit code."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("FSG_ENDO_CACHE", str(cache))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        return cli.main(["run", *args])


def only_run(uri: str, experiment: str = "polyp_size_fsg"):
    """The client and the single run of ``experiment`` in the store ``uri``."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def histories(client, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as its (step, value) history, sorted by step."""
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def assert_same_history(got: dict, want: dict) -> None:
    """Same metric keys, each logged once per step at the same steps, with the same values (perf/* aside)."""
    assert set(got) == set(want)
    for key, points in got.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
        assert steps == [s for s, _ in want[key]], key
        if not key.startswith("perf/"):
            assert [v for _, v in points] == pytest.approx(
                [v for _, v in want[key]], rel=1e-6, abs=1e-7, nan_ok=True
            ), key


def reference_run(work: Path, cache: Path) -> dict:
    """An uninterrupted run of :data:`RUN_ARGS` in ``work``: its store, run id, metric histories, steps per epoch."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    assert in_process(RUN_ARGS, work, cache, uri) == 0
    client, run = only_run(uri)
    history = histories(client, run)
    return {
        "dir": work,
        "uri": uri,
        "run_id": run.info.run_id,
        "history": history,
        "steps_per_epoch": history["epoch"][0][0],
    }


def interrupt_at(monkeypatch, signum: int, step: int, run: int = 1) -> None:
    """Send ``signum`` to this process during optimiser step ``step`` of the ``run``-th training run."""
    import fsg_endo.engine.train as train

    build, builds = train.build_recipe, [0]

    def build_interrupting(*args, **kwargs):
        recipe = build(*args, **kwargs)
        builds[0] += 1
        if builds[0] != run:
            return recipe
        inner, steps = recipe.step, [0]

        def interrupting_step(*a, **k):
            steps[0] += 1
            if steps[0] == step:
                os.kill(os.getpid(), signum)
            return inner(*a, **k)

        recipe.step = interrupting_step
        return recipe

    monkeypatch.setattr(train, "build_recipe", build_interrupting)
