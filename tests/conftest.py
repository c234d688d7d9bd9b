"""Shared fixtures: one tiny synthetic dataset cache per session, isolated MLflow stores, smoke runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests import fixtures_data directly


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """A session-wide FSG_ENDO_CACHE, so the smoke dataset is generated once per test session."""
    return tmp_path_factory.mktemp("fsg_endo_cache")


def run_cli(
    args: list[str], cwd: Path, cache: Path, uri: str, timeout: int = 600, **env: str
) -> subprocess.CompletedProcess:
    """``python experiments/run.py ARGS`` in ``cwd`` against the store ``uri``; output captured."""
    full_env = {**os.environ, "FSG_ENDO_CACHE": str(cache), "MLFLOW_TRACKING_URI": uri, **env}
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / "run.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory, data_cache) -> dict:
    """One finished smoke run of ``polyp_size_fsg`` in its own SQLite store (shared, read-only for tests)."""
    work = tmp_path_factory.mktemp("smoke_store")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    proc = run_cli(["--exp", "polyp_size_fsg", "--smoke"], work, data_cache, uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"uri": uri, "dir": work, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="session")
def hand_store(tmp_path_factory) -> dict:
    """A small hand-built MLflow store (no training) following the plan in ``fixtures_mlflow``."""
    from fixtures_mlflow import build_hand_store

    return build_hand_store(tmp_path_factory.mktemp("hand_store"))


@pytest.fixture(scope="session")
def analysis_store(tmp_path_factory, data_cache) -> dict:
    """Smoke runs for the analysis notebooks and ``fsg-endo compare``, in one SQLite store.

    ``polyp_size_fsg`` trained with ``fsg`` and then with ``fsg_gr`` (the latest), two epochs each, and a
    smoke ``regularization_sweep`` (its regularisers x 2 train fractions) of one epoch. No models are logged.
    """
    work = tmp_path_factory.mktemp("analysis_store")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    quick = ["--smoke", "--set", "tracking.log_model=false"]
    for args in (
        ["--exp", "polyp_size_fsg", "--set", "regularizer=fsg"],
        ["--exp", "polyp_size_fsg"],
        ["--exp", "regularization_sweep", "--set", "optim.epochs=1", "--set", "tracking.plots=false"],
    ):
        proc = run_cli(args + quick, work, data_cache, uri)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"uri": uri, "dir": work}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, data_cache) -> dict:
    """An uninterrupted run of ``fixtures_runs.RUN_ARGS``, which interrupted and resumed runs must reproduce."""
    from fixtures_runs import reference_run

    return reference_run(tmp_path_factory.mktemp("reference_run"), data_cache)
