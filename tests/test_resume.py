"""Resume: a run killed (SIGKILL) or stopped (SIGTERM, Ctrl-C) continues into the same MLflow run and ends
with the metrics of an uninterrupted run; every (key, step) is logged exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import REPO
from fixtures_runs import EPOCHS, RUN_ARGS, assert_same_history, histories, in_process, interrupt_at, only_run

from fsg_endo.engine.checkpoint import load_checkpoint


def killed_at(where: str, cwd: Path, cache: Path, uri: str) -> None:
    """Run RUN_ARGS in a subprocess that pauses at ``where`` (see ``paused_run.py``) and SIGKILL it there."""
    env = {**os.environ, "FSG_ENDO_CACHE": str(cache), "MLFLOW_TRACKING_URI": uri}
    marker = cwd / "paused"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "paused_run.py"), str(marker), where, *RUN_ARGS],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and marker.exists(), err[-2000:]


@pytest.mark.parametrize("where", ["mid-epoch", "after-checkpoint"])
def test_sigkill_then_resume_last(tmp_path, data_cache, reference_run, where):
    """SIGKILL inside epoch 2 (after its second step), or between epoch 2's checkpoint and the end of its
    logging (metrics already stored); ``--resume last`` ends as the uninterrupted run, each metric once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spe = reference_run["steps_per_epoch"]
    killed_at(f"step:{spe + 2}" if where == "mid-epoch" else "publish:2", tmp_path, data_cache, uri)

    # the last checkpoint, and MLflow holds nothing that checkpoint does not cover
    (last,) = tmp_path.glob("runs/*/last.pt")
    progress = load_checkpoint(last)["progress"]
    assert (progress["epoch"], progress["batch"]) == ((1, 0) if where == "mid-epoch" else (2, 0))
    client, run = only_run(uri)
    assert run.info.status == "RUNNING"
    stored = max(s for s, _ in histories(client, run)["train/loss"])
    assert stored <= progress["step"] and (where == "mid-epoch" or stored == progress["step"])

    assert in_process([*RUN_ARGS, "--resume", "last"], tmp_path, data_cache, uri) == 0
    client, resumed = only_run(uri)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    history = histories(client, resumed)
    assert [v for _, v in history["epoch"]] == [1.0, 2.0, 3.0]
    assert_same_history(history, reference_run["history"])
    gates = {a.path for a in client.list_artifacts(run.info.run_id, "gates")}
    # epoch 2's was logged by the resumed run; the init by both, from the checkpoint when resumed
    assert gates == {f"gates/epoch_{e:03d}.npz" for e in (1, 2, 3)} | {"gates/init.npz"}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_mid_epoch_checkpoint_and_resume_matches(
    tmp_path, data_cache, reference_run, monkeypatch, capsys, signum, code
):
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


def test_resume_refuses_a_finished_run(data_cache, reference_run, capsys):
    args = [*RUN_ARGS, "--resume", reference_run["run_id"]]
    assert in_process(args, reference_run["dir"], data_cache, reference_run["uri"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fsg-endo:")]
    assert len(err) == 1 and "FINISHED" in err[0] and reference_run["run_id"] in err[0]


def test_sweep_resumes_only_unfinished_children(tmp_path, data_cache, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--exp",
        "regularization_sweep",
        "--smoke",
        "--set",
        "sweep.regularizers=[none]",
        "--set",
        "sweep.train_fractions=[0.5, 1.0]",
        "--set",
        "tracking.log_model=false",
        "--set",
        "tracking.plots=false",
        "--set",
        "sweep.executor=sequential",
    ]  # Ray: tests/test_sweep_ray.py
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


def test_checkpoints_load_with_weights_only(reference_run):
    """The checkpoints hold only tensors and plain containers (torch.load(weights_only=True))."""
    (last,) = reference_run["dir"].glob("runs/*/last.pt")
    state = torch.load(last, weights_only=True)
    assert {"model", "optimizers", "schedulers", "rng", "progress"} <= set(state)
    assert set(state["optimizers"]) == {"main", "gate"}
    progress = state["progress"]
    assert progress["epoch"] == EPOCHS and ("epoch", float(EPOCHS)) in {(k, v) for k, v, *_ in progress["metrics"]}
    assert torch.load(last.parent / "best.pt", weights_only=True)["epoch"] >= 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "config.yaml", "last.pt"]  # no temp files


def test_augmentation_depends_on_seed_epoch_position_only(tmp_path, data_cache):
    """Augmented batches are the same with 0 or 2 loader workers, and an epoch resumed after its first
    batch continues with exactly the batches of the uninterrupted epoch."""
    from fsg_endo.engine.prepare import prepare_data
    from fsg_endo.experiment.config import load_config

    def epoch(workers: int, batches_done: int = 0) -> list[torch.Tensor]:
        cfg = load_config("polyp_size_fsg", [f"data.workers={workers}"], smoke=True)
        data = prepare_data(cfg)
        data.set_epoch(1, batches_done)
        return [batch["image"] for batch in data.loaders["train"]]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSG_ENDO_CACHE", str(data_cache))
        whole, threaded, resumed = epoch(0), epoch(2), epoch(0, batches_done=1)
    assert len(whole) == len(threaded) == len(resumed) + 1 > 1
    assert all(torch.equal(a, b) for a, b in zip(whole, threaded))
    assert all(torch.equal(a, b) for a, b in zip(whole[1:], resumed))
    cfg = load_config("polyp_size_fsg", ["data.augment=false"], smoke=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSG_ENDO_CACHE", str(data_cache))
        plain = prepare_data(cfg)
    plain.set_epoch(1)
    assert not torch.equal(next(iter(plain.loaders["train"]))["image"], whole[0])  # augmentation did something
