"""Tracking outages: an unreachable server fails fast, before any work; transient store failures are retried
without losing a metric; a persistent one ends the run after a checkpoint, and a resume completes the run."""

from __future__ import annotations

import socket

import mlflow
import pytest
from conftest import run_cli
from fixtures_runs import RUN_ARGS, assert_same_history, histories, in_process, only_run

from fsg_endo.engine.checkpoint import load_checkpoint
from fsg_endo.tracking.tracker import Tracker, TrackingError


@pytest.fixture
def closed_port():
    """A local port held, bound but not listening, for the test: connections are refused, and no other
    process (a Ray worker of an earlier test, say) can take the port and leave a request hanging."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.parametrize("extra", [[], ["--resume", "last"]])
def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, extra, closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    cache = tmp_path / "cache"
    proc = run_cli(["--exp", "polyp_size_fsg", "--smoke", *extra], tmp_path, cache, uri, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and uri in lines[0] and "unreachable" in lines[0] and "Traceback" not in proc.stderr
    assert not cache.exists() and not (tmp_path / "runs").exists()  # no data generated, nothing trained


class FlakyClient:
    """An MlflowClient whose ``log_batch`` of metrics fails on the listed calls (1-based), like a hiccuping store."""

    def __init__(self, client: mlflow.MlflowClient, failing) -> None:
        self.client, self.failing, self.calls = client, failing, 0

    def log_batch(self, run_id, metrics=(), **kwargs):
        if metrics:
            self.calls += 1
            if self.calls in self.failing:
                raise ConnectionError(f"store hiccup on call {self.calls}")
        return self.client.log_batch(run_id, metrics=metrics, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


class Everything:
    def __contains__(self, item) -> bool:
        return True


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(Tracker, "first_backoff", 0.01)
    monkeypatch.setattr(Tracker, "max_backoff", 0.05)


def test_transient_failures_are_retried_and_nothing_is_lost(tmp_path, fast_retries):
    tracker = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "outage")
    tracker.client = flaky = FlakyClient(tracker.client, failing={1, 2, 3, 5, 8, 13})
    for step in range(1, 21):
        tracker.log_metrics({"a": step / 2, "b": -step}, step)
    tracker.flush()
    assert tracker.unconfirmed() == [] and not tracker.failed
    tracker.end()
    assert flaky.calls == 20 + 6  # every batch once, plus one retry per failure
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    for key, value in (("a", lambda s: s / 2), ("b", lambda s: -s)):
        points = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))
        assert points == [(s, value(s)) for s in range(1, 21)]


def test_persistent_failure_keeps_metrics_unconfirmed_and_fails(tmp_path, fast_retries):
    tracker = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "outage")
    tracker.max_outage = 0.2
    tracker.client = FlakyClient(tracker.client, failing=Everything())
    tracker.log_metrics({"a": 1.0}, 1)
    tracker.log_metrics({"a": 2.0, "b": 3.0}, 2)
    with pytest.raises(TrackingError, match="tracking store sqlite:///.* failed for .*store hiccup"):
        tracker.flush()
    assert tracker.failed
    assert sorted((k, v, s) for k, v, s, _ in tracker.unconfirmed()) == [("a", 1.0, 1), ("a", 2.0, 2), ("b", 3.0, 2)]
    tracker.end("FAILED")  # returns: the store cannot be told


def test_resumed_tracker_never_logs_a_key_step_twice(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker.start(uri, "outage")
    first.log_metrics({"a": 1.0}, 1)
    first.end("KILLED")
    again = Tracker.start(uri, "outage", resume_run_id=first.run_id)
    again.log_metrics({"a": 1.0, "b": 2.0}, 1)  # a@1 is stored already
    again.log_metrics({"a": 5.0}, 2)
    again.end()
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "a")) == [(1, 1.0), (2, 5.0)]
    assert [m.value for m in client.get_metric_history(first.run_id, "b")] == [2.0]


class DownFromFirstEpochEnd:
    """Every metric batch from the first one that holds an epoch's end (key ``epoch``) on: the run's start
    (its data counts) reaches the store, and the outage begins where a checkpoint holds train and val metrics."""

    down = False

    def __call__(self, metrics) -> bool:
        self.down = self.down or any(m.key == "epoch" for m in metrics)
        return self.down


def failing_metric_batches(monkeypatch, failing) -> None:
    """Make every MlflowClient's metric ``log_batch`` fail on the listed calls (counted over the whole run),
    or, for a callable ``failing``, on the batches of metrics it returns True for."""
    log_batch, calls = mlflow.MlflowClient.log_batch, [0]

    def flaky_log_batch(self, run_id, metrics=(), **kwargs):
        if metrics:
            calls[0] += 1
            if failing(metrics) if callable(failing) else calls[0] in failing:
                raise ConnectionError(f"store hiccup on call {calls[0]}")
        return log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky_log_batch)


def test_run_through_a_hiccuping_store_loses_nothing(tmp_path, data_cache, reference_run, fast_retries, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    failing_metric_batches(monkeypatch, failing=set(range(1, 1000, 2)))  # every other call fails once
    assert in_process(RUN_ARGS, tmp_path, data_cache, uri) == 0
    monkeypatch.undo()
    client, run = only_run(uri)
    assert run.info.status == "FINISHED"
    assert_same_history(histories(client, run), reference_run["history"])


def test_persistent_outage_checkpoints_then_resume_completes(
    tmp_path, data_cache, reference_run, fast_retries, monkeypatch, capsys
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(Tracker, "max_outage", 0.3)
    # not from the start: the run's first metrics (data counts) would then fail 0.3 s later wherever training
    # stands, sometimes before the first epoch ends (a flaky test)
    failing_metric_batches(monkeypatch, failing=DownFromFirstEpochEnd())
    assert in_process(RUN_ARGS, tmp_path, data_cache, uri) == 2
    monkeypatch.undo()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fsg-endo:")]
    assert len(lines) == 1 and "tracking store" in lines[0] and "--resume" in lines[0]
    client, run = only_run(uri)
    assert run.info.status == "RUNNING" and "train/loss" not in run.data.metrics  # nothing reached the store
    (last,) = tmp_path.glob("runs/*/last.pt")
    kept = load_checkpoint(last)["progress"]["metrics"]
    assert {"train/loss", "epoch", "val/mae"} <= {key for key, *_ in kept}  # the checkpoint kept them

    assert in_process([*RUN_ARGS, "--resume", run.info.run_id], tmp_path, data_cache, uri) == 0
    client, resumed = only_run(uri)
    assert resumed.info.status == "FINISHED"
    assert_same_history(histories(client, resumed), reference_run["history"])
