"""A real two-node Ray cluster (``ray start`` on 127.0.0.1) and a real ``mlflow server``: the cluster refuses a
local SQLite store before any work, and a smoke sweep through ``--ray-address`` logs every child to the server."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import run_cli
from test_mlflow_server import free_port, mlflow_server  # noqa: F401  (the fixture)

SWEEP = [
    "--exp",
    "regularization_sweep",
    "--smoke",
    "--set",
    "sweep.regularizers=[none]",
    "--set",
    "sweep.train_fractions=[0.5, 1.0]",
    "--set",
    "optim.epochs=1",
    "--set",
    "tracking.log_model=false",
    "--set",
    "tracking.plots=false",
]
# the token authentication `ray start` enables, under this test's own token (not the user's ~/.ray/auth_token).
# On a multi-node cluster Ray swaps 127.0.0.1 for this machine's own address: the nodes never leave the machine.
CLUSTER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
}  # Linux's default, whatever a local sweep set before


def ray_node(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start --block ARGS`` in its own session (everything it starts stays in that session)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", "127.0.0.1", *args],
            env={**os.environ, **CLUSTER_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of a node (its GCS, raylet and workers), then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


NODES = (
    "import sys, time, ray\n"
    "ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, logging_level='ERROR')\n"
    "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]): time.sleep(0.5)\n"
)


def wait_nodes(address: str, n: int, timeout: float = 240) -> None:
    """Wait until the cluster has ``n`` live nodes (a driver polls it)."""
    proc = subprocess.run(
        [sys.executable, "-c", NODES, address, str(n)],
        env={**os.environ, **CLUSTER_ENV},
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head node and a second node on this machine (1 CPU each); yields the head's address; always stopped."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    address = f"127.0.0.1:{free_port()}"
    head = ray_node(
        [
            "--head",
            "--port",
            address.split(":")[1],
            "--num-cpus",
            "1",
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(temp),
        ],
        temp / "head.log",
    )
    nodes = [head]
    try:
        wait_nodes(address, 1)
        nodes.append(ray_node(["--address", address, "--num-cpus", "1"], temp / "worker.log"))
        wait_nodes(address, 2)
        yield address
    finally:
        for proc in reversed(nodes):
            stop_session(proc)


def test_smoke_sweep_on_a_cluster_logs_to_an_mlflow_server(ray_cluster, mlflow_server, tmp_path, data_cache):  # noqa: F811
    url, _ = mlflow_server
    sqlite = f"sqlite:///{tmp_path / 'local.db'}"
    proc = run_cli([*SWEEP, "--ray-address", ray_cluster], tmp_path, data_cache, sqlite, timeout=300, **CLUSTER_ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "MLflow server" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "local.db").exists()  # refused before any work

    proc = run_cli([*SWEEP, "--ray-address", ray_cluster], tmp_path, data_cache, url, timeout=600, **CLUSTER_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("regularization_sweep").experiment_id])
    (parent,) = [r for r in runs if "sweep_key" not in r.data.tags]
    kids = [r for r in runs if "sweep_key" in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["n_failed"] == "0"
    assert sorted(r.data.tags["sweep_key"] for r in kids) == ["none-frac0.5-fold0-seed0", "none-frac1-fold0-seed0"]
    for run in kids:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"lesion/test/mae", "train/loss", "epoch"} <= set(run.data.metrics)
        log = client.download_artifacts(run.info.run_id, "logs/train.log", str(tmp_path))
        assert f"run {run.info.run_id}" in Path(log).read_text()
