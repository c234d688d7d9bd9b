"""MLflow tracking (docs/interfaces.md#mlflow-names): run lifecycle, buffered async metrics, gate statistics, artifacts.

Metrics are queued and written by one background thread with ``log_batch``, so the training loop
never waits on the store. A failing store call is retried with exponential backoff, keeping every
queued metric, for up to ``max_outage`` seconds; past that the tracker is :attr:`~Tracker.failed` and
the training loop saves a checkpoint (holding the metrics still :meth:`~Tracker.unconfirmed`) and stops.
A (key, step) pair is logged at most once per run, also across a resume. Concurrent writers on one
SQLite store (the children of a parallel sweep) may see "database is locked": it is retried the same way;
two children logging one dataset at once race on its insert, and the loser's request is repeated once.
"""

from __future__ import annotations

import io
import os
import queue
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from fsg_endo.errors import FsgEndoError
from fsg_endo.tracking import plots
from fsg_endo.tracking.model_store import log_pt2_model
from fsg_endo.tracking.store import TrackingError, TrackingOutage, retry_store

MetricRecord = tuple[str, float, int, int]  # key, value, step, timestamp (ms)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
GATE_INIT_ARTIFACT = "gates/init.npz"
GRID_POINT_TAG = "grid_point"  # a sweep child's sweep.grid values, e.g. "gr.gate_lr=0.01"
_BATCH = 1000  # MLflow's log_batch limit on metrics per call
_PARAM_BATCH = 100


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``--tracking-uri``, else the config's, else the embedded SQLite."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cli_uri or config_uri or DEFAULT_TRACKING_URI


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as err:
        raise FsgEndoError(f"tracking server {uri} is unreachable: {getattr(err, 'reason', err)}") from None


# MLflow's kind of an experiment: training runs, not GenAI traces (MLflow 3.17's UI toggle still overrides it)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def git_commit() -> str:
    """The repository's HEAD commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's own source tags of a run started by ``entry_point`` (the UI's Source column and commit link)."""
    return {MLFLOW_SOURCE_NAME: entry_point, MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_GIT_COMMIT: git_commit()}


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if new; tagged as custom model development either way."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def metric_records(metrics: Mapping[str, float], step: int) -> list[MetricRecord]:
    """``metrics`` at ``step`` as records stamped now (non-finite values are kept: MLflow stores NaN)."""
    now = int(time.time() * 1000)
    return [(key, float(value), int(step), now) for key, value in metrics.items()]


def stored_steps(client: mlflow.MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """Every (key, step) a run already holds, so a resumed run never logs one twice."""
    keys = client.get_run(run_id).data.metrics
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


class Tracker:
    """One MLflow run. Metrics go through a queue to a writer thread; artifacts are written directly.

    ``seconds`` accumulates the time the caller spent inside tracker calls (the logging overhead).
    ``max_outage``: seconds a store call may keep failing (retried with backoff) before the tracker fails.
    """

    max_outage: float = 300.0
    first_backoff: float = 0.5  # seconds before the first retry, doubled after each failure
    max_backoff: float = 30.0

    def __init__(
        self,
        client: mlflow.MlflowClient,
        run_id: str,
        logged: set[tuple[str, int]] | None = None,
        max_outage: float | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.seconds = 0.0
        if max_outage is not None:
            self.max_outage = max_outage
        self._logged = set(logged or ())
        self._unconfirmed: dict[int, list[Metric]] = {}
        self._next_batch = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, list[Metric]] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
        self._writer.start()
        self._system_monitor = None

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] = (),
        params: Mapping[str, Any] = (),
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
    ) -> Tracker:
        """Create (or reopen, for ``resume_run_id``) a run in ``experiment`` and log its params and tags."""
        client = mlflow.MlflowClient(tracking_uri=uri)

        def call(fn: Callable[[], Any]) -> Any:
            return retry_store(fn, uri, cls.max_outage, cls.first_backoff, cls.max_backoff)

        if resume_run_id:
            call(lambda: client.update_run(resume_run_id, status="RUNNING"))
            return cls(client, resume_run_id, logged=call(lambda: stored_steps(client, resume_run_id)))
        exp_id = call(lambda: experiment_id(client, experiment))
        all_tags = dict(tags)
        if run_name:
            all_tags[MLFLOW_RUN_NAME] = run_name
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = call(lambda: client.create_run(exp_id, tags=all_tags, run_name=run_name))
        tracker = cls(client, run.info.run_id)
        items = [Param(k, str(v)[:6000]) for k, v in dict(params).items()]
        for i in range(0, len(items), _PARAM_BATCH):
            tracker._call(lambda chunk=items[i : i + _PARAM_BATCH]: client.log_batch(tracker.run_id, params=chunk))
        return tracker

    @property
    def failed(self) -> bool:
        """Whether the store stayed unreachable past ``max_outage`` (nothing more will be written)."""
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        """The outage that made the tracker fail, if it did."""
        return self._error

    def end(self, status: str = "FINISHED") -> None:
        """Flush every queued metric, then mark the run ``status`` (FINISHED, FAILED, KILLED).

        After a store outage the run cannot be marked: it stays RUNNING until resumed.
        """
        if self._system_monitor is not None:
            self._system_monitor.finish()
            self._system_monitor = None
        self.close()
        if not self.failed:
            self._timed(lambda: self.client.set_terminated(self.run_id, status=status))

    def close(self) -> None:
        """Flush every queued metric and stop the writer thread, leaving the run's status as it is."""
        if self._writer.is_alive():
            self._queue.join()
            self._queue.put(None)
            self._writer.join()

    def monitor_system(self, interval: float = 10.0) -> None:
        """Log MLflow's system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py) until :meth:`end`."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval, tracking_uri=self.client.tracking_uri
        )
        self._system_monitor.start()

    # -- metrics ---------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics at ``step``; non-finite values are kept (MLflow stores NaN) so gaps are visible."""
        self.log_records(metric_records(metrics, step))

    def log_records(self, records: list[MetricRecord]) -> None:
        """Queue metric records, leaving out every (key, step) this run already holds or has queued."""
        t0 = time.perf_counter()
        batch = []
        for key, value, step, timestamp in records:
            if (key, step) not in self._logged:
                self._logged.add((key, step))
                batch.append(Metric(key, value, timestamp, step))
        for i in range(0, len(batch), _BATCH):
            with self._lock:
                batch_id, self._next_batch = self._next_batch, self._next_batch + 1
                self._unconfirmed[batch_id] = batch[i : i + _BATCH]
            self._queue.put((batch_id, batch[i : i + _BATCH]))
        self.seconds += time.perf_counter() - t0

    def unconfirmed(self) -> list[MetricRecord]:
        """Queued metrics the store has not confirmed yet (a checkpoint keeps them to log after a resume)."""
        with self._lock:
            batches = list(self._unconfirmed.values())
        return [(m.key, m.value, m.step, m.timestamp) for batch in batches for m in batch]

    def flush(self) -> None:
        """Block until the writer thread has stored everything queued so far."""
        t0 = time.perf_counter()
        self._queue.join()
        self.seconds += time.perf_counter() - t0
        if self._error is not None:
            raise self._error

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                batch_id, batch = item
                if self._error is None:
                    self._call(lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch))
                    with self._lock:
                        del self._unconfirmed[batch_id]
            except TrackingError as err:  # the batch stays unconfirmed; the training loop sees `failed`
                self._error = err
            finally:
                self._queue.task_done()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` under :func:`retry_store`; an outage past ``max_outage`` makes the tracker :attr:`failed`."""
        try:
            return retry_store(fn, self.client.tracking_uri, self.max_outage, self.first_backoff, self.max_backoff)
        except TrackingOutage as err:
            self._error = err
            raise

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._timed(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    # -- artifacts -------------------------------------------------------------------------
    def log_file(self, local_path: str | os.PathLike, artifact_dir: str | None = None) -> None:
        self._timed(lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_dir))

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Store ``data`` as ``artifact_file`` (e.g. ``gates/epoch_001.npz``) via a temporary file."""
        folder, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.log_file(path, folder or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.log_bytes(text.encode(), artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        """Store a matplotlib figure as a PNG artifact and close it."""
        t0 = time.perf_counter()
        png = plots.to_png(figure)
        self.seconds += time.perf_counter() - t0
        self.log_bytes(png, artifact_file)

    def log_gates(self, values: Mapping[str, Any], artifact_file: str) -> dict[str, np.ndarray]:
        """Gate vectors (keys ``attn_LL``, ``mlp_LL``) as one ``.npz`` artifact; returns them as arrays."""
        t0 = time.perf_counter()
        arrays = {k: v.detach().cpu().numpy() for k, v in values.items()}
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        self.seconds += time.perf_counter() - t0
        self.log_bytes(buf.getvalue(), artifact_file)
        return arrays

    def log_gate_init(self, values: Mapping[str, Any]) -> None:
        """The gate values at init, ``gates/init.npz``: what ``gates/*/shift`` measures movement from."""
        self.log_gates(values, GATE_INIT_ARTIFACT)

    def log_gate_epoch(self, values: Mapping[str, Any], epoch: int, plot: bool = True) -> None:
        """Every gate vector of an epoch as ``gates/epoch_EEE.npz`` (keys ``attn_LL``, ``mlp_LL``),
        and its layer x channel heatmap as ``plots/gates_epoch_EEE.png``."""
        arrays = self.log_gates(values, f"gates/epoch_{epoch:03d}.npz")
        if plot:
            t0 = time.perf_counter()
            figure = plots.gate_heatmap(arrays, f"epoch {epoch}")
            self.seconds += time.perf_counter() - t0
            self.log_figure(figure, f"plots/gates_epoch_{epoch:03d}.png")

    def log_dataset(self, rows, source: str, name: str, context: str) -> None:
        """Log ``rows`` (a DataFrame) as an MLflow dataset input of the run: digest, ``source``, ``context``."""
        import mlflow.data

        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it;
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            # and it hints that integer columns cannot hold missing values: manifests have none
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            dataset = mlflow.data.from_pandas(rows, source=source, name=name)._to_mlflow_entity()
        entry = DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._timed(lambda: self.client.log_inputs(self.run_id, datasets=[entry]))

    def log_model(
        self, model, example, metadata: Mapping[str, Any], registered_model_name: str | None = None, step: int = 0
    ) -> None:
        """Log ``model`` as a pickle-free pt2 program with its signature and ``metadata`` (see model_store),
        linked to the run's metrics at ``step``; registered as ``registered_model_name`` if given."""
        self.flush()  # the metrics to link must be stored first
        self._timed(
            lambda: log_pt2_model(
                self.client.tracking_uri,
                self.run_id,
                model,
                example,
                metadata,
                registered_model_name=registered_model_name,
                step=step,
            )
        )

    def _timed(self, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return self._call(fn)
        finally:
            self.seconds += time.perf_counter() - t0


class NullTracker:
    """Stands in for :class:`Tracker` on ranks other than 0: every call is accepted, nothing is stored."""

    seconds = 0.0
    failed = False
    error = None

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def unconfirmed(self) -> list[MetricRecord]:
        return []

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
