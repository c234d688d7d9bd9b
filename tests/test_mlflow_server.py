"""A real ``mlflow server`` (SQLite backend, proxied local artifacts) on 127.0.0.1: a smoke run logs to it
over HTTP, and the run is read back through the server's REST API, the artifact proxy and the UI page."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import run_cli

STARTUP_S = 240  # a cold server imports FastAPI, SQLAlchemy and the UI on 2 slow cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def api(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """A REST call: POST with a JSON body, or GET with ``query``."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if body is None:
        return json.loads(get(f"{url}?{urllib.parse.urlencode(query)}"))
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (server and workers), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll ``/health`` until it answers OK; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + STARTUP_S
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if get(f"{url}/health", timeout=5) == b"OK":
                return
        except OSError:
            time.sleep(1.0)
    state = f"exited ({proc.returncode})" if proc.poll() is not None else f"not healthy after {STARTUP_S}s"
    pytest.fail(f"mlflow server {state}: {log.read_text()[-2000:]}")


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` on a free local port; yields its URL and its artifact folder; always stopped."""
    port, artifacts, log_path = free_port(), tmp_path / "artifacts", tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--artifacts-destination",
                str(artifacts),
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(url, proc, log_path)
            yield url, artifacts
        finally:
            stop(proc)


def test_smoke_run_through_a_tracking_server(mlflow_server, tmp_path, data_cache):
    url, artifacts = mlflow_server
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli(["--exp", "polyp_size_fsg", "--smoke", "--set", "optim.epochs=1"], work, data_cache, url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"open {url}/#/experiments/" in proc.stdout and "workflowType=machine_learning in a browser" in proc.stdout

    exp = api(url, "experiments/get-by-name", experiment_name="polyp_size_fsg")["experiment"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:")  # artifacts go through the server's proxy
    runs = api(url, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert tags["regularizer"] == "fsg_gr" and tags["task"] == "size_regression" and tags["data.manifest_sha256"]
    assert params["data.train_fraction"] == "1.0" and params["fsg.enabled"] == "True" and params["model.depth"] == "2"
    assert {
        "train/loss",
        "train/gate_loss",
        "val/mae",
        "lesion/test/mae",
        "gates/attn/layer_00/mean",
        "gates/mlp/layer_01/sparsity",
        "gates/all/sparsity",
        "best_epoch",
    } <= set(metrics)
    history = api(url, "metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
    assert len(history) == len({m["step"] for m in history}) >= 1

    listed = {f["path"] for f in api(url, "artifacts/list", run_id=run_id)["files"]}
    assert {"config.yaml", "data", "gates", "plots", "predictions"} <= listed
    # the model is an MLflow 3 LoggedModel of the run, its files also behind the proxy
    (model,) = mlflow.MlflowClient(url).search_logged_models([exp["experiment_id"]])
    assert model.source_run_id == run_id and model.artifact_location.startswith("mlflow-artifacts:")
    assert "MLmodel" in {a.path for a in mlflow.MlflowClient(url).list_logged_model_artifacts(model.model_id)}
    npz = get(f"{url}/get-artifact?{urllib.parse.urlencode({'run_id': run_id, 'path': 'gates/epoch_001.npz'})}")
    with np.load(io.BytesIO(npz)) as gates:
        assert sorted(gates.files) == ["attn_00", "attn_01", "mlp_00", "mlp_01"]
        assert gates["attn_00"].shape == (32,) and ((gates["attn_00"] > 0) & (gates["attn_00"] < 1)).all()
    # the proxy stored the files under --artifacts-destination, not in the client's working folder
    assert list(artifacts.rglob("gates/epoch_001.npz")) and not (work / "mlruns").exists()
    assert b"<html" in get(url).lower()  # the UI itself

    compare = subprocess.run(
        [sys.executable, "-m", "fsg_endo", "compare", "--exp", "polyp_size_fsg"],
        env={**os.environ, "MLFLOW_TRACKING_URI": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compare.returncode == 0, compare.stderr[-2000:]
    row = next(line.split() for line in compare.stdout.splitlines() if line.startswith("fsg_gr"))
    assert float(row[-2]) == pytest.approx(metrics["lesion/test/mae"], abs=1e-5)  # the mean over its one run
