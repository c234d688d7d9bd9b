"""Task image_class in the engine: the task, its data preparation (splits, ranks) and ``run.py --exp cifar100_fsg``
(the engine's metric names, run folder, a stopped run resuming to the uninterrupted result)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_images import write_cifar100
from fixtures_runs import assert_same_history, histories, in_process, interrupt_at, only_run
from sklearn.metrics import accuracy_score, f1_score

from fsg_endo.engine.checkpoint import load_checkpoint
from fsg_endo.engine.prepare import prepare_data
from fsg_endo.engine.tasks import get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import load_config

EXP = "cifar100_fsg"
# 2 epochs of 4 steps: 48 training images read (32 train, 16 val), batch 8; no model logged, no plots
RUN_ARGS = [
    "--exp",
    EXP,
    "--smoke",
    "--data-root",
    "cifar",
    "--set",
    "data.train_fraction=1.0",
    "--set",
    "tracking.log_model=false",
    "--set",
    "tracking.plots=false",
]
STEPS_PER_EPOCH = 4


def test_image_class_task_targets_predictions_and_metrics():
    task = get_task("image_class", class_names=["cat", "dog", "owl"])
    assert (task.num_outputs, task.main_metric, task.mode, task.lesion_level) == (3, "accuracy", "max", False)
    batch = {"label": torch.tensor([0, 2, 1, 2]), "image_id": ["a", "b", "c", "d"]}
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert torch.equal(task.targets(batch), torch.tensor([0, 2, 1, 2]))
    frame = task.frame_predictions(batch, task.outputs_to_numpy(logits))
    assert frame["prediction"].tolist() == [0, 2, 2, 0] and frame["prediction_name"].tolist() == [
        "cat",
        "owl",
        "owl",
        "cat",
    ]
    assert frame["confidence"].to_numpy() == pytest.approx(torch.softmax(logits, 1).max(1).values.numpy())
    metrics = task.compute_metrics(frame)
    assert metrics["accuracy"] == accuracy_score([0, 2, 1, 2], [0, 2, 2, 0]) == 0.5
    assert metrics["f1_owl"] == pytest.approx(f1_score([0, 2, 1, 2], [0, 2, 2, 0], labels=[2], average=None)[0])
    assert task.main_loss(logits, task.targets(batch)).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1, 2])).item()
    )
    with pytest.raises(FsgEndoError, match="no class names"):
        get_task("image_class")


def test_config_ties_image_class_to_image_sources():
    with pytest.raises(FsgEndoError, match="task image_class does not read 'data.source' = synthetic"):
        load_config(EXP, ["data.source=synthetic"])
    with pytest.raises(FsgEndoError, match="task size_regression does not read 'data.source' = cifar100"):
        load_config("polyp_size_fsg", ["data.source=cifar100"])
    with pytest.raises(FsgEndoError, match="'model.box_features' must be false"):
        load_config(EXP, ["model.box_features=true"])


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A working directory with a hand-written cifar-100-python folder under ``cifar/``, and what it holds."""
    work = tmp_path_factory.mktemp("cifar_work")
    return work, write_cifar100(work / "cifar")


def test_splits_come_from_the_files_and_ranks_share_an_epoch(cifar, monkeypatch):
    work, written = cifar
    monkeypatch.chdir(work)
    cfg = load_config(EXP, ["data.root=cifar", "data.train_fraction=1.0", "data.augment=false"], smoke=True)
    whole = prepare_data(cfg)
    ids = {name: set(rows["image_id"]) for name, rows in whole.splits.items()}
    assert not ids["train"] & ids["val"] and len(ids["train"] | ids["val"]) == 48 and len(ids["test"]) == 24
    assert {i.split("_")[1] for i in ids["test"]} == {"test"}  # the test split is the test file, untouched
    val = whole.splits["val"]
    labels = written["train_labels"][[int(i.rsplit("_", 1)[1]) for i in val["image_id"]]]
    assert np.array_equal(val["label"].to_numpy(), labels) and np.bincount(labels).tolist() == [4, 4, 4, 4]
    assert len(whole.class_names) == 100 and whole.files["data.json"]["class_names"][3] == "class_003"
    parts = [prepare_data(cfg, num_replicas=2, rank=r) for r in range(2)]
    for bundle in (whole, *parts):
        bundle.set_epoch(1)
    batches = [[b["image_id"] for b in bundle.loaders["train"]] for bundle in (whole, *parts)]
    assert len(batches[0]) == len(batches[1]) == STEPS_PER_EPOCH
    for k, batch in enumerate(batches[0]):
        assert sorted(batch) == sorted(batches[1][k] + batches[2][k])  # global batch k = the ranks' batch k
    assert set(parts[1].loaders) == {"train"} and {"val", "test"} <= set(parts[0].loaders)


@pytest.fixture(scope="module")
def reference(cifar, tmp_path_factory) -> str:
    """The store of one uninterrupted ``run.py`` :data:`RUN_ARGS` run (in this process: ``cli.main``, as run.py)."""
    work, _ = cifar
    cache = tmp_path_factory.mktemp("cache")
    uri = f"sqlite:///{cache / 'mlflow.db'}"
    assert in_process(RUN_ARGS, work, cache, uri) == 0
    return uri


def test_run_py_trains_cifar100_fsg_through_the_engine(cifar, reference, tmp_path):
    _, written = cifar
    client, run = only_run(reference, EXP)
    metrics = run.data.metrics
    for name in (
        "train/loss",
        "train/gate_loss",
        "train/lr",
        "train/epoch_loss",
        "train/skipped_steps",
        "val/accuracy",
        "val/macro_f1",
        "test/accuracy",
        "test/balanced_accuracy",
        "test/f1_0",
        "best_epoch",
        "gates/all/mean",
        "gates/attn/layer_00/sparsity",
        "perf/epoch_seconds",
    ):
        assert name in metrics, name
    assert not [k for k in metrics if k.startswith("lesion/")]
    assert run.data.tags["data.source_read"] == "cifar100" and run.data.params["task"] == "image_class"
    run_dir = Path(run.data.tags["checkpoint_dir"])
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "data.json", "best.pt", "last.pt"}
    assert load_checkpoint(run_dir / "last.pt")["progress"]["step"] == 2 * STEPS_PER_EPOCH
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "predictions/test.csv", str(tmp_path)))
    index = table["image_id"].str.rsplit("_", n=1).str[1].astype(int)
    assert np.array_equal(table["target"].to_numpy(), written["test_labels"][index])  # labels from the file
    assert metrics["test/accuracy"] == pytest.approx(float((table["target"] == table["prediction"]).mean()))
    assert json.loads((run_dir / "data.json").read_text())["n_test"] == len(table) == 24


def test_stopped_image_class_run_resumes_to_the_uninterrupted_result(cifar, reference, tmp_path, monkeypatch, capsys):
    work, _ = cifar
    uri, args = reference, [*RUN_ARGS, "--set", "name=cifar100_resumed"]  # same store, its own experiment
    with monkeypatch.context() as m:
        interrupt_at(m, signal.SIGTERM, step=STEPS_PER_EPOCH + 2)  # inside epoch 2
        assert in_process(args, work, tmp_path, uri) == 143
    client, run = only_run(uri, "cifar100_resumed")
    assert run.info.status == "KILLED" and "--resume" in capsys.readouterr().err
    progress = load_checkpoint(Path(run.data.tags["checkpoint_dir"]) / "last.pt")["progress"]
    assert (progress["epoch"], progress["batch"]) == (1, 2)
    assert in_process([*args, "--resume", run.info.run_id], work, tmp_path, uri) == 0
    client, resumed = only_run(uri, "cifar100_resumed")
    assert resumed.info.status == "FINISHED"
    assert_same_history(histories(client, resumed), histories(*only_run(uri, EXP)))
