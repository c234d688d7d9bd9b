"""The analysis notebooks run end to end on smoke stores; the helpers behind them on hand-built data."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import nbformat
import numpy as np
import pandas as pd
import pytest
from fixtures_mlflow import GATE_MEAN_HISTORY, GATE_RUNS, GATE_THRESHOLD, GATES, METRIC, PREDICTIONS, SWEEP
from nbclient import NotebookClient

from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment import analysis
from fsg_endo.experiment.config import load_config
from fsg_endo.experiment.sweep import child_configs

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {name: REPO / "notebooks" / f"{name}.ipynb" for name in ("gate_sparsity", "regularization_comparison")}


def execute(name: str, cwd: Path, parameters: str | None = None) -> nbformat.NotebookNode:
    """Run a notebook in ``cwd``; ``parameters`` goes in a cell after the parameters cell, as papermill does."""
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    if parameters:
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


# -- the notebooks -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "TRACKING_URI = None" in tagged[0].source


def _latest(uri: str, experiment: str, regularizer: str) -> str:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], f"tags.regularizer = '{regularizer}'", order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id


def test_gate_sparsity_notebook_from_notebooks_folder(analysis_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", analysis_store["uri"])
    nb = execute("gate_sparsity", REPO / "notebooks")
    per_cell = [images(c) for c in nb.cells if c.cell_type == "code"]
    # boxplots, heatmap, sparsity over epochs, then side by side: per-layer/histogram figure + two heatmaps
    assert per_cell == [0, 0, 1, 1, 1, 3]
    out = text(nb)
    fsg_gr, fsg = (_latest(analysis_store["uri"], "polyp_size_fsg", r) for r in ("fsg_gr", "fsg"))
    assert f"main run fsg_gr ({fsg_gr[:8]}), epoch 2" in out and fsg in out


def test_regularization_notebook_from_repo_root_with_parameters(analysis_store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = execute("regularization_comparison", REPO, f"TRACKING_URI = {analysis_store['uri']!r}")
    assert [images(c) for c in nb.cells if c.cell_type == "code"] == [0, 0, 0, 1, 1, 1]
    out = text(nb)
    cfg = load_config("regularization_sweep", smoke=True)
    n = len(list(child_configs(cfg)))
    assert f"{n} children, {n} finished; metric lesion/test/mae" in out
    paired = next(c for c in nb.cells if "sweep_report(" in c.source)
    tables = [o["data"]["text/plain"] for o in paired.outputs if "text/plain" in o.get("data", {})]
    table = next(t for t in tables if "p_corrected_t" in t)
    assert all(arm in table for arm in cfg.sweep.regularizers)


# -- finding the store ---------------------------------------------------------------------------
def test_default_tracking_uri_prefers_argument_then_environment_then_nearest_store(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "mlflow.db").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert analysis.default_tracking_uri() == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert analysis.default_tracking_uri() == "http://127.0.0.1:1"
    assert analysis.default_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_missing_store_is_an_error_and_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(FsgEndoError, match="no mlflow.db"):
        analysis.default_tracking_uri()
    with pytest.raises(FsgEndoError, match="no such MLflow store"):
        analysis.open_client(f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()


# -- gates ---------------------------------------------------------------------------------------
def test_gate_sparsity_counts_values_below_threshold():
    table = analysis.gate_sparsity({2: GATES[2]}, threshold=0.1).set_index(["branch", "layer"])
    for key, values in GATES[2].items():
        branch, layer = key.split("_")
        row = table.loc[(branch, int(layer))]
        assert row["sparsity"] == sum(v < 0.1 for v in values) / len(values)
        assert row["mean"] == pytest.approx(sum(values) / len(values))


def test_gated_runs_latest_of_each_gated_regularizer(hand_store):
    client = analysis.open_client(hand_store["uri"])
    runs = analysis.gated_runs(client, "hand_gates")
    newest_first = sorted(zip(GATE_RUNS, hand_store["gate_runs"]), key=lambda p: -p[0][1])
    expected, seen = [], set()
    for (reg, _), run_id in newest_first:
        if reg in ("fsg", "fsg_gr") and reg not in seen:
            expected.append(run_id)
            seen.add(reg)
    assert list(runs["run_id"]) == expected
    assert runs["sparsity_threshold"].tolist() == [GATE_THRESHOLD] * 2
    named = analysis.gated_runs(client, "hand_gates", [hand_store["gate_runs"][0]])
    assert list(named["run_id"]) == [hand_store["gate_runs"][0]]
    with pytest.raises(FsgEndoError, match="no finished run with gates"):
        analysis.gated_runs(client, "hand_plain")


def test_gate_artifacts_and_metric_history_read_back(hand_store):
    client = analysis.open_client(hand_store["uri"])
    run_id = hand_store["gate_runs"][0]
    epochs = analysis.load_gate_epochs(client, run_id)
    assert sorted(epochs) == sorted(GATES)
    for epoch, values in GATES.items():
        assert sorted(epochs[epoch]) == sorted(values)
        for key in values:
            np.testing.assert_array_equal(epochs[epoch][key], values[key])
    history = analysis.gate_metric_history(client, run_id, "mean")
    got = {(b, layer, s): v for b, layer, s, v in history.itertuples(index=False)}
    want = {(k.split("/")[1], int(k.split("/")[2][-2:]), s): v for k, pts in GATE_MEAN_HISTORY.items() for s, v in pts}
    assert got == want
    with pytest.raises(FsgEndoError, match="no gates/epoch_EEE.npz"):
        analysis.load_gate_epochs(client, hand_store["gate_runs"][-1])


# -- sweeps and statistics -----------------------------------------------------------------------
def test_sweep_runs_of_the_latest_parent(hand_store):
    client = analysis.open_client(hand_store["uri"])
    parent, children = analysis.sweep_runs(client, "hand_sweep")
    assert parent == hand_store["sweep_parent"]
    assert set(children["run_id"]) == set(hand_store["sweep_children"])
    old_parent, old = analysis.sweep_runs(client, "hand_sweep", hand_store["old_parent"])
    assert old_parent == hand_store["old_parent"] and len(old) == 1


def test_latest_per_cell_keeps_the_latest_finished_run(hand_store):
    client = analysis.open_client(hand_store["uri"])
    _, children = analysis.sweep_runs(client, "hand_sweep")
    cells = analysis.latest_per_cell(children)
    expected = {}
    for reg, frac, fold, seed, status, value, _start in sorted(SWEEP, key=lambda r: r[6]):
        if status == "FINISHED":
            expected[(reg, frac, fold, seed)] = value  # later starts overwrite earlier ones
    got = {(r["regularizer"], r["train_fraction"], r["fold"], r["seed"]): r[METRIC] for _, r in cells.iterrows()}
    assert got == expected


def _cells(rows) -> pd.DataFrame:
    return pd.DataFrame(
        [{"regularizer": r, "train_fraction": f, "fold": k, "seed": s, "m": v} for r, f, k, s, v in rows]
    )


def test_summarize_orders_regularizers_and_computes_mean_std():
    rows = [("fsg_gr", 1.0, 0, 0, 2.0), ("fsg_gr", 1.0, 0, 1, 4.0), ("none", 1.0, 0, 0, 3.0)]
    table = analysis.summarize(_cells(rows), ["m"])
    assert list(table.index.get_level_values(0)) == ["none", "fsg_gr"]
    assert table.loc[("fsg_gr", 1.0), "m mean"] == 3.0
    assert table.loc[("fsg_gr", 1.0), "m std"] == pytest.approx(math.sqrt(2.0))
    assert table.loc[("fsg_gr", 1.0), "m count"] == 2


def test_lesion_errors_by_size_class(hand_store):
    client = analysis.open_client(hand_store["uri"])
    _, children = analysis.sweep_runs(client, "hand_sweep")
    run = children[children["run_id"] == hand_store["predictions_run"]]
    errors = analysis.lesion_errors(client, run).set_index("lesion_id")
    frames = PREDICTIONS.groupby("lesion_id")
    for lesion, group in frames:
        expected = abs(group["prediction"].mean() - group["target"].iloc[0])
        assert errors.loc[lesion, "error"] == pytest.approx(expected)
    assert errors["size_class"].astype(str).to_dict() == {"a": "diminutive", "b": "small", "c": "large"}
    assert (errors["regularizer"] == "fsg_gr").all()
    with pytest.raises(FsgEndoError, match="predictions/test.csv"):
        analysis.lesion_errors(client, children[children["run_id"] != hand_store["predictions_run"]].head(1))
