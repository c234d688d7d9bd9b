"""Resume: a run killed (SIGKILL) or stopped (SIGTERM, Ctrl-C) continues into the same MLflow run and ends
with the metrics of an uninterrupted run; every (key, step) is logged exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import REPO, run_cli
from fixtures_runs import EPOCHS, RUN_ARGS, assert_same_history, histories, in_process, only_run

from fsg_endo.checkpoint import load_checkpoint


def step_of(stderr: Path, epoch: int) -> bool:
    """Whether the progress bar shows a finished step of ``epoch`` (1-based)."""
    return re.search(rf"epoch {epoch}/{EPOCHS}:[^\r\n]*\| [1-9]\d*/", stderr.read_text(errors="replace")) is not None


def test_sigkill_mid_epoch_then_resume_last(tmp_path, data_cache, reference_run):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "FSG_ENDO_CACHE": str(data_cache), "MLFLOW_TRACKING_URI": uri}
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "experiments" / "run.py"), *RUN_ARGS], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while not step_of(stderr, 2) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, stderr.read_text()[-2000:]

    # killed inside epoch 2: the last checkpoint is epoch 1's, and MLflow holds nothing it does not cover
    (last,) = tmp_path.glob("runs/*/last.pt")
    progress = load_checkpoint(last)["progress"]
    assert (progress["epoch"], progress["batch"]) == (1, 0)
    client, run = only_run(uri)
    assert run.info.status == "RUNNING"
    assert max(s for s, _ in histories(client, run)["train/loss"]) <= progress["step"]

    proc = run_cli([*RUN_ARGS, "--resume", "last"], tmp_path, data_cache, uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, resumed = only_run(uri)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    history = histories(client, resumed)
    assert [s for s, _ in history["epoch"]] == [s for s, _ in reference_run["history"]["epoch"]]
    assert [v for _, v in history["epoch"]] == [1.0, 2.0, 3.0]
    assert_same_history(history, reference_run["history"])


def interrupt_at(monkeypatch, signum: int, step: int, run: int = 1) -> None:
    """Send ``signum`` to this process during optimiser step ``step`` of the ``run``-th training run."""
    import fsg_endo.train as train

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


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_mid_epoch_checkpoint_and_resume_matches(tmp_path, data_cache, reference_run, monkeypatch, capsys,
                                                               signum, code):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    step = reference_run["steps_per_epoch"] + 2  # the second step of epoch 2
    interrupt_at(monkeypatch, signum, step)
    assert in_process(RUN_ARGS, tmp_path, data_cache, uri) == code
    monkeypatch.undo()
    assert handlers == {s: signal.getsignal(s) for s in handlers}  # the run's handlers are gone
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert signal.Signals(signum).name in message and "checkpoint" in message and "--resume" in message
    client, run = only_run(uri)
    assert run.info.status == "KILLED"
    (last,) = tmp_path.glob("runs/*/last.pt")
    progress = load_checkpoint(last)["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 2, step)  # stopped after that step

    assert in_process([*RUN_ARGS, "--resume", run.info.run_id], tmp_path, data_cache, uri) == 0
    client, resumed = only_run(uri)
    assert resumed.info.status == "FINISHED"
    assert_same_history(histories(client, resumed), reference_run["history"])


def test_resume_refuses_a_finished_run(tmp_path, data_cache, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--exp", "polyp_size_fsg", "--smoke", "--set", "optim.epochs=1", "--set", "tracking.log_model=false",
            "--set", "tracking.plots=false"]
    assert in_process(args, tmp_path, data_cache, uri) == 0
    _, run = only_run(uri)
    capsys.readouterr()
    assert in_process([*args, "--resume", run.info.run_id], tmp_path, data_cache, uri) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FINISHED" in err[0] and run.info.run_id in err[0]


def test_sweep_resumes_only_unfinished_children(tmp_path, data_cache, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--exp", "regularization_sweep", "--smoke", "--set", "sweep.regularizers=[none]",
            "--set", "sweep.train_fractions=[0.5, 1.0]", "--set", "tracking.log_model=false",
            "--set", "tracking.plots=false"]
    interrupt_at(monkeypatch, signal.SIGTERM, step=2, run=2)  # in the second child
    assert in_process(args, tmp_path, data_cache, uri) == 143
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("regularization_sweep").experiment_id
    before = {r.data.tags.get("sweep_key", "parent"): r for r in client.search_runs([exp_id])}
    assert sorted(r.info.status for r in before.values()) == ["FINISHED", "KILLED", "KILLED"]
    finished = next(r for r in before.values() if r.info.status == "FINISHED")

    monkeypatch.undo()
    assert in_process([*args, "--resume", before["parent"].info.run_id], tmp_path, data_cache, uri) == 0
    after = {r.data.tags.get("sweep_key", "parent"): r for r in client.search_runs([exp_id])}
    assert set(after) == set(before)  # no new runs: the parent and the killed child continued
    assert all(r.info.status == "FINISHED" for r in after.values())
    again = after[finished.data.tags["sweep_key"]]
    assert again.info.end_time == finished.info.end_time  # the finished child was not touched
    killed_key = next(k for k, r in before.items() if k != "parent" and r.info.status == "KILLED")
    resumed = histories(client, after[killed_key])
    assert [v for _, v in resumed["epoch"]] == [1.0, 2.0]
    summary = client.download_artifacts(after["parent"].info.run_id, "sweep/summary.csv", str(tmp_path))
    assert open(summary).read().count("FINISHED") == 2


def test_checkpoint_loads_with_weights_only(tmp_path, data_cache):
    """The last checkpoint holds only tensors and plain containers (torch.load(weights_only=True))."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--exp", "polyp_size_fsg", "--smoke", "--set", "optim.epochs=1", "--set", "tracking.log_model=false",
            "--set", "tracking.plots=false"]
    assert in_process(args, tmp_path, data_cache, uri) == 0
    (last,) = tmp_path.glob("runs/*/last.pt")
    state = torch.load(last, weights_only=True)
    assert {"model", "optimizers", "schedulers", "rng", "progress"} <= set(state)
    assert set(state["optimizers"]) == {"main", "gate"}
    assert not list(last.parent.glob("*.tmp*"))  # nothing half-written left behind
