"""MLflow tracking (SPEC §4): run lifecycle, buffered asynchronous metrics, gate statistics, artifacts.

Metrics are queued and written by one background thread with ``log_batch``, so the training loop
never waits on the store; transient store errors are retried with backoff and nothing is dropped.
"""

from __future__ import annotations

import io
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from fsg_endo import plots
from fsg_endo.errors import FsgEndoError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
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


def git_commit() -> str:
    """The repository's HEAD commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _retry(fn: Callable[[], Any], attempts: int = 5, base_delay: float = 0.5) -> Any:
    for i in range(attempts):
        try:
            return fn()
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(base_delay * 2**i)


class Tracker:
    """One MLflow run. Metrics go through a queue to a writer thread; artifacts are written directly.

    ``seconds`` accumulates the time the caller spent inside tracker calls (the logging overhead).
    """

    def __init__(self, client: mlflow.MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self.seconds = 0.0
        self._queue: queue.Queue[list[Metric] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
        self._writer.start()

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def start(cls, uri: str, experiment: str, *, run_name: str | None = None, tags: Mapping[str, str] = (),
              params: Mapping[str, Any] = (), parent_run_id: str | None = None,
              resume_run_id: str | None = None) -> Tracker:
        """Create (or reopen, for ``resume_run_id``) a run in ``experiment`` and log its params and tags."""
        client = mlflow.MlflowClient(tracking_uri=uri)
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            return cls(client, resume_run_id)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        all_tags = dict(tags)
        if run_name:
            all_tags[MLFLOW_RUN_NAME] = run_name
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
        tracker = cls(client, run.info.run_id)
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            _retry(lambda chunk=items[i:i + _PARAM_BATCH]: client.log_batch(tracker.run_id, params=chunk))
        return tracker

    def end(self, status: str = "FINISHED") -> None:
        """Flush every queued metric, then mark the run ``status`` (FINISHED, FAILED, KILLED)."""
        self.flush()
        self._queue.put(None)
        self._writer.join()
        _retry(lambda: self.client.set_terminated(self.run_id, status=status))

    # -- metrics ---------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics at ``step``; non-finite values are kept (MLflow stores NaN) so gaps are visible."""
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(batch), _BATCH):
            self._queue.put(batch[i:i + _BATCH])
        self.seconds += time.perf_counter() - t0

    def flush(self) -> None:
        """Block until the writer thread has stored everything queued so far."""
        t0 = time.perf_counter()
        self._queue.join()
        self.seconds += time.perf_counter() - t0
        if self._error is not None:
            err, self._error = self._error, None
            raise FsgEndoError(f"MLflow store {self.client.tracking_uri} failed: {err}") from err

    def _write_loop(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                _retry(lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch))
            except Exception as err:  # surfaced to the caller on the next flush
                self._error = err
            finally:
                self._queue.task_done()

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

    def log_gate_epoch(self, values: Mapping[str, Any], epoch: int, plot: bool = True) -> None:
        """Every gate vector of an epoch as ``gates/epoch_EEE.npz`` (keys ``attn_LL``, ``mlp_LL``),
        and its layer x channel heatmap as ``plots/gates_epoch_EEE.png``."""
        t0 = time.perf_counter()
        arrays = {k: v.detach().cpu().numpy() for k, v in values.items()}
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        self.seconds += time.perf_counter() - t0
        self.log_bytes(buf.getvalue(), f"gates/epoch_{epoch:03d}.npz")
        if plot:
            t0 = time.perf_counter()
            figure = plots.gate_heatmap(arrays, f"epoch {epoch}")
            self.seconds += time.perf_counter() - t0
            self.log_figure(figure, f"plots/gates_epoch_{epoch:03d}.png")

    def log_model(self, model, artifact_path: str = "model") -> None:
        """Save ``model`` with MLflow's PyTorch flavour (pickled module) and attach it to the run."""
        import mlflow.pytorch

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / artifact_path
            mlflow.pytorch.save_model(model, local, pip_requirements=_pip_requirements(),
                                      serialization_format="pickle")
            self.seconds += time.perf_counter() - t0
            self._timed(lambda: self.client.log_artifacts(self.run_id, str(local), artifact_path))

    def _timed(self, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return _retry(fn)
        finally:
            self.seconds += time.perf_counter() - t0


def _pip_requirements() -> list[str]:
    """Pinned requirements of a logged model, stated explicitly so MLflow does not infer them (slow)."""
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
