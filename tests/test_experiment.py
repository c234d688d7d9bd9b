"""End to end: smoke runs into temporary SQLite stores, read back with MLflow's client."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from fsg_endo.experiment.report import COLUMNS
from fsg_endo.tracking.tracker import resolve_tracking_uri


def _runs(uri: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    return client, client.search_runs([exp.experiment_id])


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_smoke_run_logs_documented_names(smoke_store):
    client, runs = _runs(smoke_store["uri"], "polyp_size_fsg")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["regularizer"] == "fsg_gr" and tags["task"] == "size_regression"
    assert len(tags["data.manifest_sha256"]) == 64 and tags["git_commit"]
    assert params["fsg.enabled"] == "True" and params["gr.enabled"] == "True"
    assert params["task"] == "size_regression" and "model.depth" in params and "data.train_fraction" in params
    for name in (
        "train/loss",
        "train/gate_loss",
        "val/mae",
        "test/mae",
        "lesion/val/mae",
        "lesion/test/mae",
        "test/within_1mm",
        "test/cls3_balanced_accuracy",
        "gates/all/mean",
        "gates/all/sparsity",
        "gates/attn/layer_00/mean",
        "gates/mlp/layer_01/std",
        "gates/mlp/layer_01/sparsity",
    ):
        assert name in metrics, name
    history = client.get_metric_history(run.info.run_id, "val/mae")
    assert len(history) == 2 and len({m.step for m in history}) == 2  # one per epoch, distinct steps

    files = _artifacts(client, run.info.run_id)
    for name in (
        "config.yaml",
        "data/split_summary.csv",
        "gates/init.npz",
        "gates/epoch_001.npz",
        "gates/epoch_002.npz",
        "plots/gates_epoch_002.png",
        "plots/confusion_test.png",
        "plots/learning_curves.png",
        "predictions/val.csv",
        "predictions/test.csv",
    ):
        assert name in files, name
    # the model is an MLflow 3 LoggedModel linked to the run (runs:/<id>/model), its files beside the run's
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.source_run_id == run.info.run_id
    assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(model.model_id)}

    local = client.download_artifacts(run.info.run_id, "gates/epoch_002.npz", str(smoke_store["dir"] / "dl"))
    gates = np.load(local)
    assert sorted(gates.files) == ["attn_00", "attn_01", "mlp_00", "mlp_01"]
    assert all(((g > 0) & (g < 1)).all() for g in gates.values())
    preds = pd.read_csv(client.download_artifacts(run.info.run_id, "predictions/test.csv", str(smoke_store["dir"])))
    assert {"lesion_id", "video_id", "frame_id", "target", "prediction"} <= set(preds.columns)
    # the logged test MAE is the MAE of the logged predictions
    assert np.isclose(metrics["test/mae"], (preds["prediction"] - preds["target"]).abs().mean(), atol=1e-4)


def test_logged_model_is_a_folded_stock_vit_that_loads_without_pickle(smoke_store, monkeypatch):
    from fsg_endo.nn.models import build_model
    from fsg_endo.tracking.model_store import load_model

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    client, (run,) = _runs(smoke_store["uri"], "polyp_size_fsg")
    loaded = load_model(f"runs:/{run.info.run_id}/model", smoke_store["uri"])
    params = run.data.params
    # the exported weights are those of a plain (gate-free) sizing ViT of the run's size: the gates were folded
    plain = build_model(
        "micro",
        int(params["data.image_size"]),
        int(params["model.patch_size"]),
        1,
        hidden_dim=int(params["model.hidden_dim"]),
        depth=int(params["model.depth"]),
        heads=int(params["model.heads"]),
        mlp_dim=int(params["model.mlp_dim"]),
        fsg=False,
        box_features=4,
    )
    exported = loaded.module.module.state_dict()
    assert set(exported) == set(plain.state_dict())
    assert all(exported[k].shape == v.shape for k, v in plain.state_dict().items())
    assert "Pickle" not in smoke_store["stderr"] and "pickle" not in smoke_store["stderr"]


def test_results_table_and_ui_hint_printed(smoke_store):
    out = smoke_store["stdout"]
    assert "frame/test" in out and "lesion/test" in out and "mae" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "127.0.0.1" in out
    # the address opens the experiment's training runs, not MLflow 3's GenAI view
    exp = mlflow.MlflowClient(smoke_store["uri"]).get_experiment_by_name("polyp_size_fsg")
    assert f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}?workflowType=machine_learning" in out


def test_ui_hint_for_a_tracking_server_opens_the_training_runs():
    from fsg_endo.experiment.launch import ui_hint

    hint = ui_hint("http://host:5000/", "7")
    assert hint == "open http://host:5000/#/experiments/7?workflowType=machine_learning in a browser"


def test_same_seed_same_metrics(tmp_path, data_cache, smoke_store):
    uri = f"sqlite:///{tmp_path / 'again.db'}"
    proc = run_cli(["--exp", "polyp_size_fsg", "--smoke"], tmp_path, data_cache, uri)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, (first,) = _runs(smoke_store["uri"], "polyp_size_fsg")
    _, (second,) = _runs(uri, "polyp_size_fsg")
    for key in ("test/mae", "val/mae", "lesion/test/rmse", "gates/all/mean", "train/loss"):
        assert first.data.metrics[key] == pytest.approx(second.data.metrics[key], rel=1e-6, abs=1e-7), key


def test_sweep_nests_children_under_one_parent(tmp_path, data_cache):
    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    proc = run_cli(
        [
            "--exp",
            "regularization_sweep",
            "--smoke",
            "--set",
            "sweep.regularizers=[none, fsg_gr]",
            "--set",
            "sweep.train_fractions=[1.0]",
            "--set",
            "tracking.log_model=false",
        ],
        tmp_path,
        data_cache,
        uri,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    client, runs = _runs(uri, "regularization_sweep")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.tags["regularizer"] for c in children) == ["fsg_gr", "none"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parents[0].data.tags["n_failed"] == "0"
    summary_path = client.download_artifacts(parents[0].info.run_id, "sweep/summary.csv", str(tmp_path))
    summary = pd.read_csv(summary_path)
    assert len(summary) == 2 and set(summary["status"]) == {"FINISHED"}
    assert "lesion/test/mae" in summary
    report = pd.read_csv(client.download_artifacts(parents[0].info.run_id, "sweep/report.csv", str(tmp_path)))
    assert list(report.columns) == COLUMNS
    assert set(zip(report["arm"], report["reference"])) == {("none", "fsg_gr"), ("fsg_gr", "none")}
    by_reg = summary.set_index("regularizer")["lesion/test/mae"]
    row = report[report["arm"] == "none"].iloc[0]
    assert row["n"] == 1 and row["diff_mean"] == pytest.approx(by_reg["none"] - by_reg["fsg_gr"])
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "sweep")}
    assert {"sweep/report.md", "sweep/report.png"} <= artifacts


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "optim.epochz=3"], "optim.epochz"),
        (["--set", "optim.epochs=three"], "optim.epochs"),
        (["--set", "regularizer=l2"], "regularizer"),
        (["--profile", "nope"], "nope"),
    ],
)
def test_config_errors_are_one_line_before_any_work(tmp_path, data_cache, args, needle):
    uri = f"sqlite:///{tmp_path / 'err.db'}"
    proc = run_cli(["--exp", "polyp_size_fsg", "--smoke", *args], tmp_path, data_cache, uri, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "err.db").exists()  # nothing was started


def test_unknown_experiment_is_one_line(tmp_path, data_cache):
    proc = run_cli(["--exp", "no_such_exp"], tmp_path, data_cache, f"sqlite:///{tmp_path / 'x.db'}", timeout=120)
    assert proc.returncode == 2 and "no_such_exp" in proc.stderr and "Traceback" not in proc.stderr


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == "sqlite:///mlflow.db"
    assert resolve_tracking_uri(None, "sqlite:///cfg.db") == "sqlite:///cfg.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000", "sqlite:///cfg.db") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri("http://127.0.0.1:5000", "sqlite:///cfg.db") == "sqlite:///env.db"


def test_split_summary_artifact_counts_lesions(smoke_store):
    client, (run,) = _runs(smoke_store["uri"], "polyp_size_fsg")
    text = open(client.download_artifacts(run.info.run_id, "data/split_summary.csv", str(smoke_store["dir"]))).read()
    summary = pd.read_csv(io.StringIO(text))
    assert list(summary["split"]) == ["train", "val", "test"]
    assert (summary["lesions"] > 0).all() and (summary["frames"] >= summary["lesions"]).all()
