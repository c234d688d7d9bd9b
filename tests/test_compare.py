"""``fsg-endo compare``: the table against hand-computed statistics, the CLI, and a smoke sweep."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections import defaultdict

import mlflow
import pytest
from fixtures_mlflow import METRIC, OLD_CHILD, SWEEP

from fsg_endo.cli import main
from fsg_endo.experiment.compare import compare_table
from fsg_endo.experiment.config import load_config
from fsg_endo.experiment.sweep import child_configs


def _expected(rows) -> dict:
    """Per (regulariser, fraction): finished cells (latest run of each), failed runs, mean and std of METRIC."""
    latest, failed = {}, defaultdict(int)
    for reg, frac, fold, seed, status, value, start in rows:
        if status == "FAILED":
            failed[(reg, frac)] += 1
        elif (reg, frac, fold, seed) not in latest or latest[(reg, frac, fold, seed)][0] < start:
            latest[(reg, frac, fold, seed)] = (start, value)
    groups = defaultdict(list)
    for (reg, frac, _, _), (_, value) in latest.items():
        groups[(reg, frac)].append(value)
    return {
        key: (len(v), failed[key], statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None)
        for key, v in groups.items()
    } | {key: (0, n, None, None) for key, n in failed.items() if key not in groups}


def test_table_matches_hand_computed_groups(hand_store):
    table = compare_table("hand_sweep", tracking_uri=hand_store["uri"])
    expected = _expected([*SWEEP, OLD_CHILD])
    got = {}
    for (reg, frac), row in table.iterrows():
        std = row[f"{METRIC} std"]
        got[(reg, frac)] = (row["runs"], row["failed"], row[f"{METRIC} mean"], None if std != std else std)
    assert set(got) == set(expected)
    for key, (runs, failed, mean, std) in expected.items():
        g_runs, g_failed, g_mean, g_std = got[key]
        assert (g_runs, g_failed) == (runs, failed), key
        assert g_mean == pytest.approx(mean) if mean is not None else g_mean != g_mean
        assert g_std == pytest.approx(std) if std is not None else g_std is None
    # regularisers in the schema's order, the sweep parents left out
    assert list(dict.fromkeys(table.index.get_level_values(0))) == ["none", "dropout", "fsg", "fsg_gr"]


def test_several_metrics_and_environment_uri(hand_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", hand_store["uri"])
    table = compare_table("hand_plain", metric=f"{METRIC}, lesion/test/balanced_accuracy")
    assert list(table.columns) == [
        "runs",
        "failed",
        f"{METRIC} mean",
        f"{METRIC} std",
        "lesion/test/balanced_accuracy mean",
        "lesion/test/balanced_accuracy std",
    ]
    assert table.loc[("none", 1.0), f"{METRIC} mean"] == 1.0
    assert table.loc[("none", 0.5), "lesion/test/balanced_accuracy mean"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--exp", "nope"],
            "no experiment 'nope' (the store has: Default, hand_empty, hand_gates, hand_plain, hand_sweep)",
        ),
        (["--exp", "hand_empty"], "experiment 'hand_empty' has no runs"),
        (["--exp", "hand_plain"], "name one with --metric"),
        (["--exp", "hand_sweep", "--metric", "test/nope"], "no finished run logged test/nope"),
    ],
)
def test_cli_errors_are_one_line(hand_store, capsys, monkeypatch, args, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare", *args, "--tracking-uri", hand_store["uri"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_missing_store_is_not_created(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlflow.db"
    assert main(["compare", "--exp", "x", "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert "no such MLflow store" in capsys.readouterr().err and not store.exists()


def test_smoke_sweep_table(analysis_store):
    """The command on a real smoke sweep: one row per regulariser and fraction, values as the runs logged them."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": analysis_store["uri"]}
    proc = subprocess.run(
        [sys.executable, "-m", "fsg_endo", "compare", "--exp", "regularization_sweep"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = mlflow.MlflowClient(tracking_uri=analysis_store["uri"])
    exp = client.get_experiment_by_name("regularization_sweep")
    children = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")
    expected = len(list(child_configs(load_config("regularization_sweep", smoke=True))))
    assert len(children) == expected
    lines = proc.stdout.splitlines()
    assert "lesion/test/mae mean" in lines[0]
    rows = lines[2:]
    assert len(rows) == expected
    for run in children:
        reg, frac = run.data.tags["regularizer"], float(run.data.params["data.train_fraction"])
        value = f"{run.data.metrics[METRIC]:.6f}"
        assert sum(value in line and f"{frac:.1f}" in line for line in rows) == 1, (reg, frac, value)
