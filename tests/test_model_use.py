"""Using a trained model: evaluate on a dataset in another layout, predict on a video, the registered model,
and MLflow's own conventions (experiment kind, source tags, dataset inputs, system metrics), read back with
MLflow's client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from fixtures_data import write_sun

from fsg_endo.cli import main
from fsg_endo.data.manifest import load_manifest
from fsg_endo.data.pipeline import frame_index
from fsg_endo.data.splits import make_splits
from fsg_endo.tracking.model_store import global_store

NAME = "polyp_sizer_test"
SUN_SIZES = [3.0, 7.0, 12.0, 15.0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> dict:
    """A smoke model trained on the synthetic dataset and registered as :data:`NAME`."""
    work = tmp_path_factory.mktemp("model_use")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    proc = run_cli(
        ["--exp", "polyp_size_fsg", "--smoke", "--set", f"tracking.register_model={NAME}"], work, data_cache, uri
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("polyp_size_fsg")
    (run,) = client.search_runs([exp.experiment_id])
    manifest = Path(json.loads(run.inputs.dataset_inputs[0].dataset.source)["uri"])
    preds = pd.read_csv(client.download_artifacts(run.info.run_id, "predictions/test.csv", str(work)))
    return {
        "uri": uri,
        "dir": work,
        "client": client,
        "exp": exp,
        "run": run,
        "proc": proc,
        "manifest": manifest,
        "root": data_cache / "synthetic_s0_v4",
        "test_preds": preds,
    }


@pytest.fixture
def store_env(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.chdir(trained["dir"])
    return trained


def _new_runs(trained, before: set[str]):
    runs = trained["client"].search_runs([trained["exp"].experiment_id])
    return [r for r in runs if r.info.run_id not in before]


def _run_ids(trained) -> set[str]:
    return {r.info.run_id for r in trained["client"].search_runs([trained["exp"].experiment_id])}


def test_model_has_signature_and_preprocessing_metadata_and_no_pickle_warning(trained):
    with global_store(trained["uri"]):  # restores MLflow's URI and MLFLOW_TRACKING_URI for the tests after this one
        info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    inputs = {s.name: list(s.shape) for s in info.signature.inputs.inputs}
    params = trained["run"].data.params
    size = int(params["data.image_size"])
    assert inputs == {"image": [-1, 3, size, size], "box": [-1, 4]}
    meta = info.metadata["fsg_endo"]
    assert (meta["image_size"], meta["context"], meta["fov_mask"]) == (
        size,
        float(params["data.context"]),
        params["data.fov_mask"] == "True",
    )
    assert len(meta["mean"]) == len(meta["std"]) == 3 and meta["task"] == params["task"]
    assert "pickle" not in trained["proc"].stderr.lower()


def test_pickled_models_are_refused_when_pickle_is_disallowed(tmp_path, monkeypatch):
    import mlflow.pytorch
    import torch

    from fsg_endo.errors import FsgEndoError
    from fsg_endo.tracking.model_store import load_model

    mlflow.pytorch.save_model(
        torch.nn.Linear(2, 1),
        tmp_path / "m",
        serialization_format="pickle",
        metadata={"fsg_endo": {"task": "size_regression"}},
        pip_requirements=["torch"],
    )
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(FsgEndoError, match="cannot load"):
        load_model(str(tmp_path / "m"), "sqlite:///" + str(tmp_path / "x.db"))


def test_registered_version_links_run_and_metrics(trained):
    client, run = trained["client"], trained["run"]
    version = client.get_model_version(NAME, "1")
    assert version.run_id == run.info.run_id
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id and logged.experiment_id == trained["exp"].experiment_id
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["lesion/test/mae"] == pytest.approx(run.data.metrics["lesion/test/mae"])


def test_mlflow_conventions_experiment_kind_source_tags_and_dataset_inputs(trained):
    import subprocess

    run, exp = trained["run"], trained["exp"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    ).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["mlflow.source.name"].endswith("run.py")
    params = run.data.params
    manifest = load_manifest(trained["manifest"])
    train = make_splits(manifest, int(params["data.test_fold"]), int(params["data.val_fold"]))["train"]
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    assert inputs["train"].digest == mlflow.data.from_pandas(train).digest
    assert f'"{trained["manifest"]}"' in inputs["train"].source


def test_epoch_lines_instead_of_progress_bars_off_a_terminal(trained):
    out, err = trained["proc"].stdout, trained["proc"].stderr
    assert "epoch 1/2  loss" in out and "epoch 2/2  loss" in out
    assert "\r" not in err and "it/s" not in err


def test_evaluate_on_a_sun_layout_dataset(store_env, tmp_path, capsys):
    root = tmp_path / "sun"
    sizes_csv, expected = write_sun(root, SUN_SIZES, frames_per_case=3, frame_size=(120, 100))
    before = _run_ids(store_env)
    trained_id = store_env["run"].info.run_id
    assert (
        main(["evaluate", "--model", f"runs:/{trained_id}/model", "--data-root", str(root), "--sizes", str(sizes_csv)])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"{len(expected)} boxes of {len(SUN_SIZES)} lesions" in printed
    assert "frame/test" in printed and "lesion/test" in printed and "mae" in printed
    (run,) = _new_runs(store_env, before)
    assert run.data.tags["evaluates"] == trained_id and run.data.tags["dataset"] == "sun"
    client = store_env["client"]
    preds = pd.read_csv(client.download_artifacts(run.info.run_id, "predictions/test.csv", str(tmp_path)))
    truth = preds["lesion_id"].map(lambda case: SUN_SIZES[int(case.removeprefix("case")) - 1])
    assert len(preds) == len(expected)
    assert run.data.metrics["test/mae"] == pytest.approx((preds["prediction"] - truth).abs().mean(), abs=1e-6)
    per_lesion = preds.groupby("lesion_id")["prediction"].mean()
    lesion_truth = per_lesion.index.map(lambda case: SUN_SIZES[int(case.removeprefix("case")) - 1])
    assert run.data.metrics["lesion/test/mae"] == pytest.approx(np.abs(per_lesion - lesion_truth).mean(), abs=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/confusion_test.png" in artifacts
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.tags[0].value == "test"


def test_evaluate_on_the_training_test_fold_reproduces_the_runs_predictions(store_env, capsys):
    """The crop and normalisation stored with the model are those of training: same frames, same sizes."""
    params = store_env["run"].data.params
    fold = int(params["data.test_fold"])
    before = _run_ids(store_env)
    assert (
        main(
            [
                "evaluate",
                "--model",
                f"models:/{NAME}/1",
                "--data-root",
                str(store_env["root"]),
                "--format",
                "synthetic",
                "--fold",
                str(fold),
            ]
        )
        == 0
    )
    (run,) = _new_runs(store_env, before)
    assert run.data.tags["dataset"] == "synthetic"
    preds = pd.read_csv(
        store_env["client"].download_artifacts(run.info.run_id, "predictions/test.csv", str(store_env["dir"]))
    )
    manifest = load_manifest(store_env["manifest"])
    assert len(preds) == (manifest["fold"] == fold).sum()
    both = store_env["test_preds"].merge(preds, on=["lesion_id", "frame_id"], suffixes=("_train", "_eval"))
    assert len(both) == len(store_env["test_preds"])
    np.testing.assert_allclose(both["prediction_eval"], both["prediction_train"], atol=1e-3)


def _video_boxes(trained, video_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = load_manifest(trained["manifest"])
    rows = rows[rows["video_id"] == video_id].reset_index(drop=True)
    boxes = pd.DataFrame(
        {
            "frame_index": rows["frame_id"].map(frame_index),
            "xmin": rows["xmin"],
            "ymin": rows["ymin"],
            "xmax": rows["xmax"],
            "ymax": rows["ymax"],
            "lesion_id": rows["lesion_id"],
        }
    )
    return rows, boxes


def test_predict_on_a_video_with_lesion_summary(store_env, tmp_path, capsys):
    video_id = store_env["test_preds"]["video_id"].iloc[0]
    rows, boxes = _video_boxes(store_env, video_id)
    boxes.to_csv(tmp_path / "boxes.csv", index=False)
    out = tmp_path / "out" / "sizes.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                f"models:/{NAME}/1",
                "--video",
                str(store_env["root"] / "videos" / f"{video_id}.mp4"),
                "--boxes",
                str(tmp_path / "boxes.csv"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    sized = pd.read_csv(out)
    assert len(sized) == len(boxes) and (sized["frame_index"] == boxes["frame_index"]).all()
    size = sized["size_mm"].to_numpy()
    assert np.isfinite(size).all()
    assert (sized["size_class3"] == np.where(size <= 5, 0, np.where(size < 10, 1, 2))).all()
    assert (sized["size_class2"] == (size >= 10)).all()
    lesions = pd.read_csv(out.with_name("sizes_lesions.csv")).set_index("lesion_id")
    mean = sized.groupby("lesion_id")["size_mm"].mean()
    np.testing.assert_allclose(lesions.loc[mean.index, "size_mm"], mean, rtol=1e-6)
    assert (lesions.loc[mean.index, "n_frames"] == sized.groupby("lesion_id").size()).all()


def test_predict_on_frames_matches_the_runs_test_predictions(store_env, tmp_path):
    test = store_env["test_preds"]
    rows = load_manifest(store_env["manifest"]).merge(test[["lesion_id", "frame_id", "prediction"]])
    rows[["frame_path", "xmin", "ymin", "xmax", "ymax"]].to_csv(tmp_path / "boxes.csv", index=False)
    assert (
        main(
            [
                "predict",
                "--model",
                f"models:/{NAME}/1",
                "--frames",
                str(store_env["root"]),
                "--boxes",
                str(tmp_path / "boxes.csv"),
                "--out",
                str(tmp_path / "sizes.csv"),
            ]
        )
        == 0
    )
    sized = pd.read_csv(tmp_path / "sizes.csv")
    np.testing.assert_allclose(sized["size_mm"], rows["prediction"], atol=1e-3)
    assert not (tmp_path / "sizes_lesions.csv").exists()  # no lesion ids, no lesion summary


def _write_video(path: Path, frames: int = 5, size: tuple[int, int] = (64, 48)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 40 * i, np.uint8))
    writer.release()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_video", "file missing"),
        ("box_outside", "leaves the 64x48 frame"),
        ("not_a_number", "xmin 'ten' is not a number"),
        ("missing_column", "lacks column(s) ymax"),
        ("beyond_end", "beyond the 5 frames"),
        ("missing_frame", "file missing"),
    ],
)
def test_predict_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, case, expected):
    video = tmp_path / "v.mp4"
    _write_video(video)
    table = "frame_index,xmin,ymin,xmax,ymax\n0,10,10,20,20\n"
    args = ["--video", str(video if case != "missing_video" else tmp_path / "none.mp4")]
    table = {
        "box_outside": "frame_index,xmin,ymin,xmax,ymax\n0,10,10,20,20\n1,50,10,70,20\n",
        "not_a_number": "frame_index,xmin,ymin,xmax,ymax\n0,ten,10,20,20\n",
        "missing_column": "frame_index,xmin,ymin,xmax\n0,10,10,20\n",
        "beyond_end": "frame_index,xmin,ymin,xmax,ymax\n7,10,10,20,20\n",
    }.get(case, table)
    if case == "missing_frame":
        (tmp_path / "frames").mkdir()
        args, table = ["--frames", str(tmp_path / "frames")], "frame_path,xmin,ymin,xmax,ymax\nf1.jpg,1,1,5,5\n"
    (tmp_path / "boxes.csv").write_text(table)
    out = tmp_path / "sizes.csv"
    code = main(
        ["predict", "--model", "models:/none/1", *args, "--boxes", str(tmp_path / "boxes.csv"), "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists() and list(tmp_path.glob("*sizes*")) == []


def test_system_metrics_are_logged_when_asked(tmp_path):
    from fsg_endo.tracking.tracker import Tracker

    tracker = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "sysmetrics")
    tracker.monitor_system(interval=0.2)
    time.sleep(1.5)
    tracker.end()
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


def test_evaluate_names_a_model_that_is_not_there(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["evaluate", "--model", "runs:/0123456789abcdef/model", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()  # beside MLflow's notice that it created the new store
    (line,) = [line for line in err.splitlines() if line.startswith("fsg-endo:")]
    assert "model runs:/0123456789abcdef/model: not found" in line and "Traceback" not in err, err
