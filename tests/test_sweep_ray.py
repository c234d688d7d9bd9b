"""Sweeps on Ray: concurrent children equal the sequential sweep, a killed worker is retried from its checkpoint
into the same run (or FAILED past ``sweep.max_retries``), a stopped driver leaves KILLED children that
``--resume`` continues. One local Ray instance (2 CPUs) serves the module."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import REPO
from fixtures_runs import histories, in_process

from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.executors import connect_ray, default_concurrency
from fsg_endo.synth.dataset import is_complete, resolve_params
from fsg_endo.tracking.tracker import Tracker

EXP = "regularization_sweep"
# 4 children (2 regularisers x 2 fractions), 3 epochs of several steps: room to kill a child between checkpoints
GRID = [
    "--exp",
    EXP,
    "--smoke",
    "--set",
    "sweep.regularizers=[none, fsg]",
    "--set",
    "sweep.train_fractions=[0.5, 1.0]",
    "--set",
    "optim.epochs=3",
    "--set",
    "tracking.log_model=false",
    "--set",
    "tracking.plots=false",
]
TWO = [*GRID, "--set", "sweep.regularizers=[none]"]  # the grid's first two children


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module's in-process sweeps (they reuse it instead of starting their own)."""
    import ray

    environ = dict(os.environ)
    connect_ray(None, num_cpus=2)  # sets Ray's variables for a local instance in this process
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, data_cache) -> dict:
    """The grid swept sequentially: every child's params, tags, artifacts and metric histories by sweep key."""
    work = tmp_path_factory.mktemp("sequential_sweep")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    assert in_process([*GRID, "--set", "sweep.executor=sequential"], work, data_cache, uri) == 0
    return children(uri)


def children(uri: str) -> dict:
    """The sweep's parent and each child (run, histories, artifacts) by sweep key."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(EXP).experiment_id])
    out = {"parents": [r for r in runs if "sweep_key" not in r.data.tags]}
    for run in runs:
        if "sweep_key" in run.data.tags:
            files = {a.path for a in client.list_artifacts(run.info.run_id)}
            out[run.data.tags["sweep_key"]] = {"run": run, "history": histories(client, run), "artifacts": files}
    return out


def assert_same_points(got: dict, want: dict, rel: float = 1e-4) -> None:
    """Same metric keys, each at the same steps once, values equal up to thread-count rounding (perf/* aside)."""
    assert set(got) == set(want)
    for key, points in got.items():
        assert [s for s, _ in points] == [s for s, _ in want[key]], key
        if not key.startswith("perf/"):
            assert [v for _, v in points] == pytest.approx([v for _, v in want[key]], rel=rel, abs=1e-5, nan_ok=True), (
                key
            )


def kill_worker_when(work: Path, ready, sig: int = signal.SIGKILL) -> threading.Thread:
    """A thread that waits until a child's checkpoint folder satisfies ``ready`` and kills its worker (pid from
    the child's log); ``thread.killed`` is the run id of that child."""

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and thread.killed is None:
            for log in work.glob("runs/*/train.log"):
                pids = re.findall(r"\(pid (\d+)\)", log.read_text())
                if pids and ready(log.parent):
                    os.kill(int(pids[-1]), sig)
                    thread.killed = log.parent.name
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.killed = None
    thread.start()
    return thread


def attempt_starts(log: Path) -> list[float]:
    """When each attempt of a child began (seconds since the epoch), from the headers of its log."""
    stamps = re.findall(r"^--- .* at (\S+ \S+)$", log.read_text(), flags=re.M)
    return [time.mktime(time.strptime(s, "%Y-%m-%d %H:%M:%S")) for s in stamps]


def test_default_concurrency_fills_cpus_and_gpus():
    assert default_concurrency({"CPU": 8.0}, cpus=1.0, gpus=0.0) == 8
    assert default_concurrency({"CPU": 2.0}, cpus=0.5, gpus=0.0) == 4
    assert default_concurrency({"CPU": 16.0, "GPU": 2.0}, cpus=1.0, gpus=0.25) == 8  # four children per GPU
    assert default_concurrency({"CPU": 4.0, "GPU": 2.0}, cpus=1.0, gpus=0.25) == 4  # CPUs are the limit
    assert default_concurrency({"CPU": 1.0}, cpus=2.0, gpus=0.0) == 1
    with pytest.raises(FsgEndoError, match="no GPU"):
        default_concurrency({"CPU": 4.0}, cpus=1.0, gpus=0.5)


def test_tracker_absorbs_database_is_locked(tmp_path, monkeypatch):
    """Every store call of a run's life (create, params, metrics, end, reopen) passes a locked SQLite store."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("locks")
    locked = {"get_experiment_by_name": 2, "create_run": 2, "log_batch": 4, "set_terminated": 1, "update_run": 2}

    def locking(name: str):
        real = getattr(mlflow.MlflowClient, name)

        def call(self, *args, **kwargs):
            if locked[name]:
                locked[name] -= 1
                raise MlflowException(
                    "(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE
                )
            return real(self, *args, **kwargs)

        return call

    for name in locked:
        monkeypatch.setattr(mlflow.MlflowClient, name, locking(name))
    monkeypatch.setattr(Tracker, "first_backoff", 0.01)
    tracker = Tracker.start(uri, "locks", run_name="r", params={"a": 1})
    tracker.log_metrics({"m": 1.0}, step=0)
    tracker.log_metrics({"m": 2.0}, step=1)
    tracker.end()
    Tracker.start(uri, "locks", resume_run_id=tracker.run_id).end()
    assert not any(locked.values())  # every call met the lock
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "m")] == [(0, 1.0), (1, 2.0)]


def generate_counting(root: Path, counter: Path, barrier) -> None:
    """``ensure_synthetic`` in a fresh process, counting how often it generates (started with the others)."""
    import fsg_endo.synth.dataset as synth

    generate = synth.generate_dataset

    def counted(*args, **kwargs):
        with open(counter, "a") as out:
            out.write("x")
        return generate(*args, **kwargs)

    synth.generate_dataset = counted
    barrier.wait()
    synth.ensure_synthetic(root, n_videos=1, seed=3, frames_per_video=10, image_size=64, progress=False, workers=1)


def test_concurrent_children_generate_the_synthetic_dataset_once(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    root, counter, barrier = tmp_path / "synthetic", tmp_path / "generated", spawn.Barrier(2)
    procs = [spawn.Process(target=generate_counting, args=(root, counter, barrier)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert counter.read_text() == "x" and is_complete(root, resolve_params(1, 3, 10, 64))


def test_four_concurrent_children_equal_the_sequential_sweep(ray_local, sequential, tmp_path, data_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert in_process([*GRID, "--set", "sweep.resources.cpus=0.5"], tmp_path, data_cache, uri) == 0  # 4 at once
    got = children(uri)
    (parent,) = got.pop("parents")
    want = {k: v for k, v in sequential.items() if k != "parents"}
    assert set(got) == set(want) and len(got) == 4
    runs = [c["run"].info for c in got.values()]
    assert max(r.start_time for r in runs) < min(r.end_time for r in runs)  # all four ran at the same time
    for key, child in got.items():
        run, ref = child["run"], want[key]["run"]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params == ref.data.params | {"sweep.resources.cpus": "0.5", "sweep.executor": "ray"}
        assert set(run.data.tags) == set(ref.data.tags)
        for tag in ("regularizer", "task", "data.manifest_sha256", "mlflow.runName"):
            assert run.data.tags[tag] == ref.data.tags[tag], tag
        assert child["artifacts"] == want[key]["artifacts"] | {"logs"}
        assert_same_points(child["history"], want[key]["history"])


def test_killed_worker_is_retried_from_its_checkpoint_into_the_same_run(ray_local, sequential, tmp_path, data_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killer = kill_worker_when(tmp_path, lambda run_dir: (run_dir / "last.pt").exists())
    assert in_process([*TWO, "--set", "sweep.max_retries=1"], tmp_path, data_cache, uri) == 0
    assert killer.killed, "no child was killed"
    got = children(uri)
    assert len(got.pop("parents")) == 1 and len(got) == 2  # no new run for the retry
    (killed,) = [c for c in got.values() if c["run"].info.run_id == killer.killed]
    assert all(c["run"].info.status == "FINISHED" for c in got.values())
    first, second = (tmp_path / "runs" / killer.killed / "train.log").read_text().split("--- ")[1:]
    assert "epoch 1/" in first and "epoch 1/" not in second  # the retry went on from the epoch-1 checkpoint
    key = killed["run"].data.tags["sweep_key"]
    assert_same_points(killed["history"], sequential[key]["history"])


def test_worker_killed_past_its_retries_fails_and_the_sweep_goes_on(ray_local, tmp_path, data_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killer = kill_worker_when(tmp_path, lambda run_dir: (run_dir / "config.yaml").exists())
    assert in_process([*TWO, "--set", "sweep.max_retries=0"], tmp_path, data_cache, uri) == 0
    got = children(uri)
    (parent,) = got.pop("parents")
    status = {c["run"].info.run_id: c["run"].info.status for c in got.values()}
    assert status.pop(killer.killed) == "FAILED" and list(status.values()) == ["FINISHED"]
    assert parent.data.tags["n_failed"] == "1" and parent.data.tags["failed_children"] == killer.killed
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert [a.path for a in client.list_artifacts(killer.killed, "logs")] == ["logs/train.log"]


def store_is_unlocked(db: Path) -> bool:
    """Whether no connection holds a lock on the SQLite file (an exclusive transaction can begin at once)."""
    conn = sqlite3.connect(db, timeout=0.2)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        conn.rollback()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def freeze_at_first_checkpoint(work: Path, n: int, driver: subprocess.Popen) -> list[int]:
    """SIGSTOP each child's worker (pid from its log) once its first checkpoint exists, until ``n`` are stopped
    (so none can finish); their pids. A worker stopped inside a store call would hold the SQLite lock and starve
    the others, so it is let go and stopped again a moment later."""
    frozen: dict[str, int] = {}
    deadline = time.monotonic() + 300
    while len(frozen) < n:
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[1][-3000:]
        for log in work.glob("runs/*/train.log"):
            if log.parent.name not in frozen and (log.parent / "last.pt").exists():
                pid = int(re.findall(r"\(pid (\d+)\)", log.read_text())[-1])
                os.kill(pid, signal.SIGSTOP)
                if store_is_unlocked(work / "mlflow.db"):
                    frozen[log.parent.name] = pid
                else:
                    os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    return list(frozen.values())


def test_stopped_driver_leaves_killed_children_that_resume_continues(ray_local, sequential, tmp_path, data_cache):
    """SIGTERM on a driver (its own process) while both children train (held after their first checkpoint): each
    checkpoints and ends KILLED; the resumed sweep continues both, in parallel, logging what the sequential one did."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "FSG_ENDO_CACHE": str(data_cache), "MLFLOW_TRACKING_URI": uri}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "experiments" / "run.py"), *TWO],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    frozen = []
    try:
        frozen = freeze_at_first_checkpoint(tmp_path, 2, driver)
        driver.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the driver asks the children to stop; they see it once they run again
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    try:
        _, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 143, err[-3000:]
    for log in tmp_path.glob("runs/*/train.log"):  # the driver's own local instance listens on loopback only
        assert re.search(r"^--- .* on \S+ 127\.0\.0\.1 \(pid", log.read_text(), flags=re.M), log.read_text()[:300]
    before = children(uri)
    (parent,) = before.pop("parents")
    assert parent.info.status == "KILLED" and len(before) == 2
    assert all(c["run"].info.status == "KILLED" for c in before.values())
    assert all(c["history"]["epoch"][-1][1] < 3 for c in before.values())  # stopped before the end

    assert in_process([*TWO, "--resume", parent.info.run_id], tmp_path, data_cache, uri) == 0
    after = children(uri)
    assert [p.info.status for p in after.pop("parents")] == ["FINISHED"] and set(after) == set(before)
    killed_at = max(c["run"].info.end_time / 1000 for c in before.values())
    for child in after.values():  # each child ran again after the stop (when depends on Ray's worker start-up)
        assert attempt_starts(tmp_path / "runs" / child["run"].info.run_id / "train.log")[-1] >= killed_at - 1
    for key, child in after.items():
        assert child["run"].info.run_id == before[key]["run"].info.run_id
        assert child["run"].info.status == "FINISHED"
        assert_same_points(child["history"], sequential[key]["history"])
