"""Task text_class: the CSV and Hugging Face dataset readers, tokenising, the classifier over a transformers model,
and the task's predictions and metrics; nothing is downloaded (a tiny random-init BERT from a written folder)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_text import VOCAB, is_test_row, write_corpus, write_tiny_bert
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from fsg_endo.data.text import (
    TextSet,
    check_text_source,
    encode,
    load_tokenizer,
    read_hf_dataset,
    read_text_csv,
    text_dataset,
)
from fsg_endo.engine.tasks import get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import gate_logits, gate_parameters, non_gate_parameters
from fsg_endo.nn.hf_text import build_text_classifier


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


# -- readers ------------------------------------------------------------------------------------
def test_csv_split_column_gives_the_held_out_rows(tmp_path):
    rows = write_corpus(tmp_path / "c.csv", n=40, split=True)
    data = read_text_csv(tmp_path / "c.csv")
    assert data.class_names == ("negative", "positive") and data.source == "text_csv"
    want_test = [(t, lab) for i, (t, lab) in enumerate(rows) if is_test_row(i)]
    got_test = [(t, data.class_names[k]) for t, k in zip(data.test.texts, data.test.labels.tolist())]
    assert got_test == want_test
    assert len(data.train) == 30 and data.test.ids[0] == "row_8"  # row 6 of the corpus is line 8 of the file


def test_csv_without_split_holds_out_a_stratified_fold(tmp_path):
    write_corpus(tmp_path / "c.csv", n=40)
    df = pd.read_csv(tmp_path / "c.csv")
    data = read_text_csv(tmp_path / "c.csv", folds=4, test_fold=2, seed=1)
    assert sorted(data.train.texts + data.test.texts) == sorted(df["text"])
    assert not set(data.train.ids) & set(data.test.ids) and len(data.test) == 10
    assert np.bincount(data.test.labels.numpy()).tolist() == [5, 5]
    lookup = dict(zip(df["text"], df["label"]))
    assert all(lookup[t] == data.class_names[k] for t, k in zip(data.test.texts, data.test.labels.tolist()))
    other = read_text_csv(tmp_path / "c.csv", folds=4, test_fold=3, seed=1)
    assert not set(other.test.ids) & set(data.test.ids)
    small = read_text_csv(tmp_path / "c.csv", folds=4, test_fold=2, seed=1, train_limit=10, test_limit=4)
    assert len(small.train) == 10 and len(small.test) == 4 and set(small.test.ids) <= set(data.test.ids)


def test_integer_labels_are_named_in_numeric_order(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{lab}\n" for i, lab in enumerate([10, 2, 2, 10, 1, 1] * 3)))
    data = read_text_csv(path, folds=3)
    assert data.class_names == ("1", "2", "10")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "no text CSV there: give your own CSV"),
        ("words,label\na,b\n", "no column 'text'"),
        ("text,label,split\na,x,train\nb,y,dev\n", "split column holds 'dev'"),
        ("text,label\na,x\nb,x\n", "one label only"),
        ("text,label\na,x\n,y\n", "row 3 has an empty text or label"),
    ],
)
def test_csv_problems_are_one_clear_line(tmp_path, text, match):
    path = tmp_path / "c.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(FsgEndoError, match=match):
        read_text_csv(path)


def test_missing_root_says_what_to_provide():
    with pytest.raises(FsgEndoError, match="data.source=text_csv needs data.root: give your own CSV"):
        check_text_source("text_csv", None)


class FakeSplit:
    """What the reader uses of a ``datasets.Dataset``: columns, features, a column as a list, len."""

    def __init__(self, columns: dict, features: dict) -> None:
        self.columns, self.features = columns, features
        self.column_names = list(columns)

    def __getitem__(self, column: str) -> list:
        return self.columns[column]


def test_hf_dataset_by_name_reads_train_and_validation(monkeypatch):
    label = SimpleNamespace(names=["neg", "pos"])  # a ClassLabel
    splits = {
        "train": FakeSplit({"sentence": ["a", "b", "c", "d"], "label": [1, 0, 1, 0]}, {"label": label}),
        "validation": FakeSplit({"sentence": ["e", "f"], "label": [0, 1]}, {"label": label}),
    }
    calls = []
    fake = SimpleNamespace(load_dataset=lambda name: calls.append(name) or splits)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = read_hf_dataset("glue_sst2_like", text_column="sentence")
    assert calls == ["glue_sst2_like"] and data.source == "hf_dataset"
    assert data.class_names == ("neg", "pos") and data.train.labels.tolist() == [1, 0, 1, 0]
    assert data.test.texts == ["e", "f"] and data.test.ids == ["validation_0", "validation_1"]
    assert "validation split is held out" in data.note
    with pytest.raises(FsgEndoError, match="no column 'text'"):
        read_hf_dataset("glue_sst2_like")


def test_hf_dataset_problems_are_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(FsgEndoError, match="needs the datasets package"):
        read_hf_dataset("imdb")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=offline))
    with pytest.raises(FsgEndoError, match=r"data.root=imdb: Hugging Face dataset not loaded \(ConnectionError\)"):
        read_hf_dataset("imdb")


# -- tokenising -----------------------------------------------------------------------------------
def test_tokens_are_the_vocabulary_ids_padded_and_truncated(bert):
    tokenizer = load_tokenizer(str(bert))
    ids = {token: k for k, token in enumerate(VOCAB)}
    texts = ["good film", "the plot was very dull and the cast poor"]
    out = encode(texts, tokenizer, max_length=6)
    first = [ids["[CLS]"], ids["good"], ids["film"], ids["[SEP]"]]
    second = [ids["[CLS]"]] + [ids[w] for w in texts[1].split()[:4]] + [ids["[SEP]"]]
    assert out["input_ids"].tolist() == [first + [ids["[PAD]"]] * 2, second]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    split = TextSet(texts, torch.tensor([1, 0]), ["a", "b"])
    item = text_dataset(split, tokenizer, 6)[1]
    assert item["input_ids"].tolist() == second and (item["label"], item["text_id"]) == (0, "b")


def test_missing_model_folder_is_one_clear_line(tmp_path):
    with pytest.raises(FsgEndoError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(FsgEndoError, match="model.hf_model=.*nowhere: no transformers model"):
        build_text_classifier(str(tmp_path / "nowhere"), ("a", "b"), pretrained=False)


# -- model ----------------------------------------------------------------------------------------
def test_arms_start_from_the_same_weights_and_gates_from_their_own_seed(bert):
    torch.manual_seed(0)
    plain = build_text_classifier(str(bert), ("a", "b", "c"), pretrained=False)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    gated = build_text_classifier(str(bert), ("a", "b", "c"), pretrained=False, fsg=True, gate_seed=7)
    assert torch.equal(torch.rand(3), after_plain)  # the gates left the global RNG alone
    assert len(gate_parameters(gated)) == 4  # two per block, two blocks
    for p, q in zip(plain.parameters(), non_gate_parameters(gated), strict=True):
        assert torch.equal(p, q)
    torch.manual_seed(1)
    again = build_text_classifier(str(bert), ("a", "b", "c"), pretrained=False, fsg=True, gate_seed=7)
    for key, g in gate_logits(gated).items():
        assert torch.equal(g, gate_logits(again)[key])
    assert plain.model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_pretrained_folder_is_loaded_and_logits_come_back(bert, tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    source = build_text_classifier(str(bert), ("a", "b"), pretrained=False).model.eval()
    source.save_pretrained(tmp_path / "trained")
    load_tokenizer(str(bert)).save_pretrained(tmp_path / "trained")
    model = build_text_classifier(str(tmp_path / "trained"), ("a", "b")).eval()
    ids = torch.tensor([[2, 5, 13, 3], [2, 9, 3, 0]])
    mask = (ids > 0).long()
    reference = BertForSequenceClassification.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        assert torch.allclose(model(ids, mask), reference(input_ids=ids, attention_mask=mask).logits)
        assert torch.allclose(model(ids, mask), source(input_ids=ids, attention_mask=mask).logits)


# -- task -----------------------------------------------------------------------------------------
def test_text_class_task_predictions_and_metrics():
    task = get_task("text_class", class_names=["neg", "neu", "pos"])
    assert (task.name, task.num_outputs, task.main_metric, task.lesion_level) == ("text_class", 3, "accuracy", False)
    labels = [0, 2, 1, 2, 1]
    batch = {"label": torch.tensor(labels), "text_id": ["r2", "r3", "r4", "r5", "r6"]}
    logits = torch.tensor([[3.0, 0, 0], [0, 0, 2.0], [0, 0, 1.0], [1.0, 0, 0], [0, 4.0, 0]])
    frame = task.frame_predictions(batch, task.outputs_to_numpy(logits))
    pred = [0, 2, 2, 0, 1]
    assert frame["text_id"].tolist() == batch["text_id"] and frame["prediction"].tolist() == pred
    assert frame["prediction_name"].tolist() == ["neg", "pos", "pos", "neg", "neu"]
    metrics = task.compute_metrics(frame)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert metrics["f1_pos"] == pytest.approx(f1_score(labels, pred, labels=[2], average=None)[0])
    with pytest.raises(FsgEndoError, match="text_class: no class names"):
        get_task("text_class")


def test_gpt2_classifier_reads_the_last_real_token_of_a_padded_text(tmp_path):
    """GPT-2 has no pad token: the classifier pads with end-of-text and still classifies from each text's last
    real token, so a padded text gets the logits it gets alone."""
    from transformers import GPT2Config

    GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, eos_token_id=49).save_pretrained(tmp_path)
    model = build_text_classifier(str(tmp_path), ("a", "b"), pretrained=False, fsg=True, gate_seed=0).eval()
    assert model.model.config.pad_token_id == 49 and len(gate_parameters(model)) == 4
    short, long = [5, 7, 9], [5, 7, 9, 11, 13]
    batch = torch.tensor([short + [49, 49], long])
    with torch.no_grad():
        padded = model(batch, (batch != 49).long())
        alone = model(torch.tensor([short]), torch.ones(1, 3, dtype=torch.long))
    assert torch.allclose(padded[0], alone[0], atol=1e-5)
