"""``run.py --exp text_fsg --smoke`` through the engine's one training loop, read back from MLflow: the metrics, gate
statistics and params of each arm, the held-out predictions, the logged transformers model; the config's checks and
the one line a run without files prints. A toy corpus and a tiny random-init BERT written here; nothing downloaded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from fixtures_runs import assert_same_history, histories, in_process, interrupt_at, only_run
from fixtures_text import is_test_row, write_corpus, write_tiny_bert
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from fsg_endo.engine.checkpoint import load_checkpoint
from fsg_endo.engine.recipe import gate_seed
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import load_config
from fsg_endo.experiment.demos import training_main
from fsg_endo.nn.gates import gate_logits
from fsg_endo.nn.hf_text import build_text_classifier

REPO = Path(__file__).resolve().parents[1]
EXP = "text_fsg"
CORPUS_ROWS = 96  # every fourth pair of rows held out: 72 train rows (48 read under --smoke), 24 test rows
SMOKE_ARGS = ["--exp", EXP, "--smoke", "--data-root", "corpus.csv", "--set", "tracking.plots=false"]
MODEL_ARGS = ["--set", "model.hf_model=bert", "--set", "model.hf_init=random"]
STEPS_PER_EPOCH = 4  # 48 training texts read under --smoke: 32 train, 16 val; batch 8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with ``corpus.csv`` (a split column) and ``bert/`` (a tiny BERT folder, no weights)."""
    work = tmp_path_factory.mktemp("text_work")
    rows = write_corpus(work / "corpus.csv", n=CORPUS_ROWS, split=True)
    write_tiny_bert(work / "bert")
    return work, rows


def arm_args(regularizer: str, *extra: str) -> list[str]:
    return [*SMOKE_ARGS, *MODEL_ARGS, "--set", f"regularizer={regularizer}", *extra]


def run_arm(work: Path, tmp: Path, regularizer: str, *extra: str):
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert in_process(arm_args(regularizer, *extra), work, tmp / "cache", uri) == 0
    return only_run(uri, EXP)


@pytest.fixture(scope="module")
def routed(work, tmp_path_factory):
    """The ``fsg_gr`` smoke run (the config's arm), its model logged: the MLflow client and run."""
    return run_arm(work[0], tmp_path_factory.mktemp("fsg_gr"), "fsg_gr", "--set", "tracking.log_model=true")


def test_smoke_run_logs_the_metrics_gates_and_params(work, routed):
    client, run = routed
    metrics, params = run.data.metrics, run.data.params
    assert (params["fsg.enabled"], params["gr.enabled"], params["task"]) == ("True", "True", "text_class")
    assert run.data.tags["task"] == "text_class" and run.info.status == "FINISHED"
    for name in ("train/loss", "train/gate_loss", "val/accuracy", "test/accuracy", "test/balanced_accuracy"):
        assert name in metrics, name
    for branch in ("attn", "mlp"):
        for layer in ("00", "01"):  # two gated BERT layers
            assert 0 < metrics[f"gates/{branch}/layer_{layer}/mean"] < 1
    assert metrics["gates/all/shift"] > 0  # the gate optimiser moved them
    assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == 2  # two smoke epochs

    # the held-out predictions are the CSV's test rows, and the logged metrics are theirs
    folder = Path(client.download_artifacts(run.info.run_id, "predictions"))
    table = pd.read_csv(folder / "test.csv")
    _, rows = work
    want = {f"row_{i + 2}": label for i, (_, label) in enumerate(rows) if is_test_row(i)}
    assert dict(zip(table["text_id"], table["target_name"])) == want
    target, pred = table["target"], table["prediction"]
    assert metrics["test/accuracy"] == pytest.approx(accuracy_score(target, pred))
    assert metrics["test/balanced_accuracy"] == pytest.approx(balanced_accuracy_score(target, pred))
    assert metrics["test/macro_f1"] == pytest.approx(f1_score(target, pred, average="macro", labels=[0, 1]))


def test_stopped_text_run_resumes_to_the_uninterrupted_result(work, routed, tmp_path, monkeypatch, capsys):
    client, reference = routed
    uri = client.tracking_uri
    args = arm_args("fsg_gr", "--set", "tracking.log_model=true", "--set", "name=text_resumed")
    with monkeypatch.context() as m:
        interrupt_at(m, signal.SIGTERM, step=STEPS_PER_EPOCH + 2)  # inside epoch 2
        assert in_process(args, work[0], tmp_path, uri) == 143
    _, run = only_run(uri, "text_resumed")
    assert run.info.status == "KILLED" and "--resume" in capsys.readouterr().err
    progress = load_checkpoint(Path(run.data.tags["checkpoint_dir"]) / "last.pt")["progress"]
    assert (progress["epoch"], progress["batch"]) == (1, 2)
    assert in_process([*args, "--resume", run.info.run_id], work[0], tmp_path, uri) == 0
    _, resumed = only_run(uri, "text_resumed")
    assert resumed.info.status == "FINISHED"
    assert_same_history(histories(client, resumed), histories(client, reference))


def test_logged_model_is_a_stock_transformers_folder_that_predicts_the_same(work, routed):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

    client, run = routed
    folder = Path(client.download_artifacts(run.info.run_id, "model"))
    meta = json.loads((folder / "fsg_endo.json").read_text())
    assert (meta["task"], meta["regularizer"], meta["class_names"]) == (
        "text_class",
        "fsg_gr",
        ["negative", "positive"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(model) is BertForSequenceClassification
    assert not [k for k in model.state_dict() if "gate" in k]  # folded: the stock state dict
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, rows = work
    texts = [text for i, (text, _) in enumerate(rows) if is_test_row(i)]
    tokens = tokenizer(texts, padding="longest", truncation=True, max_length=meta["max_length"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens).logits
    table = pd.read_csv(Path(client.download_artifacts(run.info.run_id, "predictions")) / "test.csv")
    assert logits.argmax(1).tolist() == table["prediction"].tolist()
    assert torch.softmax(logits, 1).max(1).values.numpy() == pytest.approx(table["confidence"].to_numpy(), abs=1e-5)


def test_plain_arm_learns_the_corpus(work, tmp_path):
    """The plain model (no gates) on all 72 training texts for 8 epochs: the held-out texts are classified far
    above chance (0.5), so tokens, labels and predictions line up from the CSV to the logged metrics."""
    learn = ["--set", "optim.lr=3e-3", "--set", "optim.epochs=8", "--set", "data.train_limit=72"]
    _, run = run_arm(work[0], tmp_path, "none", "--set", "tracking.log_model=false", *learn)
    params, metrics = run.data.params, run.data.metrics
    assert (params["fsg.enabled"], params["gr.enabled"]) == ("False", "False")
    assert not [k for k in metrics if k.startswith("gates/")]
    assert metrics["test/accuracy"] >= 0.9


def test_joint_fsg_arm_logs_its_gates(work, tmp_path):
    _, run = run_arm(work[0], tmp_path, "fsg", "--set", "tracking.log_model=false")
    assert (run.data.params["fsg.enabled"], run.data.params["gr.enabled"]) == ("True", "False")
    assert run.data.metrics["gates/all/shift"] > 0 and "test/accuracy" in run.data.metrics


def test_frozen_gates_stay_at_their_init(work, tmp_path):
    client, run = run_arm(work[0], tmp_path, "fsg_frozen", "--set", "tracking.log_model=false")
    assert (run.data.params["fsg.enabled"], run.data.params["gr.enabled"]) == ("True", "False")
    run_dir = Path(run.data.tags["checkpoint_dir"])
    trained = load_checkpoint(run_dir / "last.pt")["model"]
    init = gate_logits(build_text_classifier(str(work[0] / "bert"), ("a", "b"), False, True, gate_seed(0)))
    assert len(init) == 4
    for key, logits in init.items():
        branch, layer = key.split("_")
        block = f"model.bert.encoder.layer.{int(layer)}.gate_{branch}"
        assert torch.equal(trained[block], logits)
    assert run.data.metrics["gates/all/shift"] == 0.0


def test_config_ties_text_class_to_its_sources_and_keys():
    with pytest.raises(FsgEndoError, match="task text_class does not read 'data.source' = mnist"):
        load_config(EXP, ["data.source=mnist"])
    with pytest.raises(FsgEndoError, match="task image_class does not read 'data.source' = text_csv"):
        load_config("demo_mnist", ["data.source=text_csv"])
    with pytest.raises(FsgEndoError, match="task text_class needs 'model.hf_model'"):
        load_config(EXP, ["model.hf_model=null"])
    for arm in ("dropout", "layerscale"):
        with pytest.raises(FsgEndoError, match=f"regularizer {arm} is an arm of the study's ViT"):
            load_config(EXP, [f"regularizer={arm}"])
    with pytest.raises(
        FsgEndoError, match="'data.max_length' is read by task text_class only, not by task image_class"
    ):
        load_config("demo_mnist", ["data.max_length=32"])
    with pytest.raises(FsgEndoError, match="'model.hf_model' is read by task text_class only"):
        load_config("polyp_size_fsg", ["model.hf_model=bert-base-uncased"])
    with pytest.raises(FsgEndoError, match="'data.shift' is read by task image_class only, not by task text_class"):
        load_config(EXP, ["data.shift=2"])
    smoke = load_config(EXP, smoke=True)
    assert (smoke.data.train_limit, smoke.data.test_limit) == (48, 24)


def test_no_files_offline_is_one_line_saying_what_to_provide(tmp_path):
    """The demo script in an empty folder: no CSV, no run opened, one line, exit 2."""
    script = REPO / "experiments" / "demos" / "demo_training_text.py"
    env = {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo_training_text.py: error: data/text.csv: no text CSV there")
    assert "columns text,label" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_demo_script_flags_train_through_the_runner(work, tmp_path, monkeypatch):
    monkeypatch.chdir(work[0])
    monkeypatch.setenv("FSG_ENDO_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--smoke", "--data-root", "corpus.csv", "--weights", "bert", "--epochs", "1", "--batch-size", "16"]
    argv += ["--checkpoint", str(tmp_path / "runs"), "--tracking-uri", uri, "--set", "model.hf_init=random"]
    assert training_main("text", argv) == 0
    _, run = only_run(uri, EXP)
    params = run.data.params
    assert (params["model.hf_model"], params["optim.epochs"], params["optim.batch_size"]) == ("bert", "1", "16")
    assert len(mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val/accuracy")) == 1
    assert Path(run.data.tags["checkpoint_dir"]).parent == (tmp_path / "runs").resolve()
