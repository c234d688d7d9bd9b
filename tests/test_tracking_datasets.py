"""Dataset inputs: sweep children logging one split at the same moment all get it linked (MLflow's SQL store
looks a dataset up, then inserts it, so concurrent writers race on the insert); other rejections still fail."""

from __future__ import annotations

import multiprocessing

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from fsg_endo.tracking.tracker import Tracker, TrackingError

WRITERS = 4
ROUNDS = 4  # without the retry, each round of 4 racing writers failed at least one of them about half the time


def rows(round_: int) -> pd.DataFrame:
    return pd.DataFrame({"video_id": ["v0", "v1", "v2"], "size_mm": [3.0, 6.5, float(round_)]})


def log_splits_at_once(uri: str, experiment_id: str, barrier, results) -> None:
    """One sweep child per round: create a run, wait for the other writers, then log that round's split."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    for round_ in range(ROUNDS):
        run_id = client.create_run(experiment_id).info.run_id
        tracker = Tracker(client, run_id, max_outage=10)
        barrier.wait()
        try:
            tracker.log_dataset(rows(round_), source="/data/manifest.csv", name=f"split-{round_}", context="train")
            results.put((round_, run_id, "ok"))
        except TrackingError as err:
            results.put((round_, run_id, str(err)))
        finally:
            tracker.close()


def test_concurrent_children_logging_one_split_all_link_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("race")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=log_splits_at_once, args=(uri, exp, barrier, results)) for _ in range(WRITERS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in range(WRITERS * ROUNDS)]
    for p in procs:
        p.join(timeout=60)
    assert {outcome for _, _, outcome in outcomes} == {"ok"}, outcomes
    for round_, run_id, _ in outcomes:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [d.dataset.name for d in inputs] == [f"split-{round_}"]
        assert [t.value for t in inputs[0].tags] == ["train"]
    # one dataset per split, shared by the runs that logged it
    names = sorted(d.dataset.name for r in client.search_runs([exp]) for d in r.inputs.dataset_inputs)
    assert names == sorted(f"split-{r}" for r in range(ROUNDS) for _ in range(WRITERS))


class RejectingClient:
    """An MlflowClient whose ``log_inputs`` raises ``error`` once, then delegates."""

    def __init__(self, client: mlflow.MlflowClient, error: Exception) -> None:
        self.client, self.error = client, error

    def log_inputs(self, *args, **kwargs):
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.client.log_inputs(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store and experiment for the rejection cases (creating a store's tables takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    return client, client.create_experiment("e")


@pytest.mark.parametrize(
    "message, linked",
    [
        ("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name", True),
        ("(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint", True),
        ("Invalid value for dataset name", False),
    ],
)
def test_only_a_lost_insert_race_is_repeated(store, message, linked):
    client, exp = store
    run_id = client.create_run(exp).info.run_id
    error = MlflowException(message, error_code=BAD_REQUEST)  # what MLflow's SQL store raises for a rejected write
    tracker = Tracker(RejectingClient(client, error), run_id)
    try:
        if linked:
            tracker.log_dataset(rows(0), source="/data/manifest.csv", name="split", context="train")
        else:
            with pytest.raises(TrackingError, match="rejected a request: Invalid value"):
                tracker.log_dataset(rows(0), source="/data/manifest.csv", name="split", context="train")
    finally:
        tracker.close()
    assert len(client.get_run(run_id).inputs.dataset_inputs) == int(linked)
