"""Text-classification sources of the ``text_class`` task: the user's own CSV, or a Hugging Face dataset by name.

Every reader returns a :class:`TextData`: the texts in memory, labels as indices into ``class_names``. The
CSV (``text_csv``) has one row per text with columns ``text`` and ``label`` (other names: the reader's
``text_column`` / ``label_column``) and optionally ``split`` (``train`` or ``test``); without ``split``,
fold ``test_fold`` of ``folds`` class-stratified folds is held out. A Hugging Face dataset (``hf_dataset``,
the ``datasets`` package) is read by name or from a local folder, its ``train`` split and its ``test`` one
(else ``validation``). :func:`text_dataset` serves a split tokenised by the model's tokenizer as dict items.
Nothing is downloaded here except by ``datasets`` / ``transformers`` for a hub name, and a missing file or
model is one clear error line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from fsg_endo.data.image_folders import stratified_subset, validation_split
from fsg_endo.errors import FsgEndoError

__all__ = [
    "TEXT_SOURCES",
    "TextData",
    "TextSet",
    "check_text_source",
    "encode",
    "load_tokenizer",
    "read_hf_dataset",
    "read_text_csv",
    "text_dataset",
]

TEXT_SOURCES = ("text_csv", "hf_dataset")
CSV_HINT = (
    "give your own CSV (--data-root FILE or data.root) with columns text,label, one row per text "
    '(e.g. "a fine film",positive), and optionally a split column of train/test'
)


@dataclass
class TextSet:
    """One split: texts, int64 labels (N,) and an identifier per text."""

    texts: list[str]
    labels: Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> TextSet:
        return TextSet([self.texts[i] for i in index], self.labels[index], [self.ids[i] for i in index])


@dataclass
class TextData:
    """Train and held-out splits of one source; ``source`` says what was read (``text_csv`` or ``hf_dataset``)."""

    train: TextSet
    test: TextSet
    class_names: tuple[str, ...]
    source: str
    note: str = ""


def _class_names(values: Sequence[Any]) -> tuple[str, ...]:
    """The distinct labels as names, in numeric order when they are all integers, else in text order."""
    distinct = {str(v) for v in values}
    integers = all(v.lstrip("-").isdigit() for v in distinct)
    return tuple(sorted(distinct, key=int) if integers else sorted(distinct))


def _split(texts: Sequence[str], labels: Sequence[Any], ids: Sequence[str], names: tuple[str, ...]) -> TextSet:
    index = {name: k for k, name in enumerate(names)}
    return TextSet(list(texts), torch.tensor([index[str(v)] for v in labels], dtype=torch.int64), list(ids))


def _limit(split: TextSet, fraction: float, limit: int | None, seed: int) -> TextSet:
    """At most ``min(round(fraction * N), limit)`` texts of ``split``, stratified by class."""
    n = max(1, round(fraction * len(split)))
    n = n if limit is None else min(n, limit)
    return split.subset(stratified_subset(split.labels, n, seed))


def _finish(
    train: TextSet, test: TextSet, names: tuple[str, ...], source: str, reduce: dict[str, Any], note: str = ""
) -> TextData:
    """Reduce the splits as configured: ``fraction`` and ``train_limit`` of train, ``test_limit`` of test."""
    seed = reduce["seed"]
    return TextData(
        _limit(train, reduce["fraction"], reduce["train_limit"], seed),
        _limit(test, 1.0, reduce["test_limit"], seed),
        names,
        source,
        note,
    )


def check_text_source(source: str, root: str | os.PathLike | None) -> None:
    """Raise the one-line error a reader would for a missing CSV, without reading it (before a run opens)."""
    if source not in TEXT_SOURCES:
        raise FsgEndoError(f"data.source={source}: not a text source ({', '.join(TEXT_SOURCES)})")
    if not root:
        raise FsgEndoError(f"data.source={source} needs data.root: {CSV_HINT}")
    if source == "text_csv" and not Path(root).is_file():
        raise FsgEndoError(f"{root}: no text CSV there: {CSV_HINT}")


def read_text_csv(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    folds: int = 5,
    test_fold: int = 0,
    seed: int = 0,
    fraction: float = 1.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> TextData:
    """The user's CSV of texts and labels; the held-out split is its ``split == test`` rows, else a stratified fold."""
    check_text_source("text_csv", path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise FsgEndoError(f"{path}: not a readable CSV ({type(err).__name__}): {CSV_HINT}") from None
    for column in (text_column, label_column):
        if column not in df:
            raise FsgEndoError(f"{path}: no column {column!r} (columns: {', '.join(df.columns)}): {CSV_HINT}")
    empty = df.index[(df[text_column].str.strip() == "") | (df[label_column].str.strip() == "")]
    if len(empty):
        raise FsgEndoError(f"{path}: row {empty[0] + 2} has an empty text or label")
    names = _class_names(df[label_column])
    if len(names) < 2:
        raise FsgEndoError(f"{path}: one label only ({names[0] if names else 'none'}); a classifier needs two or more")
    rows = _split(df[text_column], df[label_column], [f"row_{i + 2}" for i in df.index], names)  # 2: the file line
    if "split" in df:
        bad = sorted(set(df["split"]) - {"train", "test"})
        if bad:
            raise FsgEndoError(f"{path}: split column holds {bad[0]!r}; use train or test")
        is_test = (df["split"] == "test").to_numpy()
        train, test = rows.subset(np.flatnonzero(~is_test)), rows.subset(np.flatnonzero(is_test))
    else:
        train, test = validation_split(rows, folds, test_fold, seed)
    if not len(train) or not len(test):
        raise FsgEndoError(f"{path}: the split column leaves no {'train' if not len(train) else 'test'} rows")
    reduce = {"seed": seed, "fraction": fraction, "train_limit": train_limit, "test_limit": test_limit}
    return _finish(train, test, names, "text_csv", reduce)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise FsgEndoError(
            "data.source=hf_dataset needs the datasets package (pip install datasets), or use data.source=text_csv"
        ) from None
    return datasets


def read_hf_dataset(
    name: str,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    fraction: float = 1.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> TextData:
    """A Hugging Face dataset (a hub name, which needs the network the first time, or a local folder): its
    ``train`` split, and ``test`` (else ``validation``) held out; class names from a ``ClassLabel`` column."""
    datasets = _import_datasets()
    try:
        splits = datasets.load_dataset(name)
    except Exception as err:  # datasets raises many types for an unknown name or no network
        raise FsgEndoError(
            f"data.root={name}: Hugging Face dataset not loaded ({type(err).__name__}); offline, "
            f"{CSV_HINT} and set data.source=text_csv"
        ) from None
    held_out = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or held_out is None:
        raise FsgEndoError(f"{name}: needs a train split and a test or validation split (has {', '.join(splits)})")
    for column in (text_column, label_column):
        if column not in splits["train"].column_names:
            raise FsgEndoError(f"{name}: no column {column!r} (columns: {', '.join(splits['train'].column_names)})")
    feature = splits["train"].features[label_column]
    names = tuple(feature.names) if hasattr(feature, "names") else _class_names(splits["train"][label_column])

    def read(split: str) -> TextSet:
        labels = splits[split][label_column]
        labels = [names[v] for v in labels] if hasattr(feature, "names") else labels
        ids = [f"{split}_{i}" for i in range(len(labels))]
        return _split(splits[split][text_column], labels, ids, names)

    reduce = {"seed": seed, "fraction": fraction, "train_limit": train_limit, "test_limit": test_limit}
    note = "" if held_out == "test" else f"{name} has no test split: its validation split is held out"
    return _finish(read("train"), read(held_out), names, "hf_dataset", reduce, note)


def load_tokenizer(name_or_folder: str):
    """The model's tokenizer (``AutoTokenizer``): a hub name (network on first use) or a local folder."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_folder)
    except (OSError, ValueError) as err:
        raise FsgEndoError(
            f"model.hf_model={name_or_folder}: no tokenizer ({type(err).__name__}); give a hub name on a machine "
            "with a network, or a local folder of a transformers model (config.json, tokenizer files)"
        ) from None
    if tokenizer.pad_token is None:  # GPT-2: pad with the end-of-text token (masked out)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(texts: Sequence[str], tokenizer, max_length: int) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` (N, L) int64: truncated to ``max_length`` tokens, padded to the
    longest text of ``texts`` (L <= ``max_length``)."""
    if not texts:
        return {
            "input_ids": torch.zeros(0, 1, dtype=torch.int64),
            "attention_mask": torch.zeros(0, 1, dtype=torch.int64),
        }
    out = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {key: out[key].to(torch.int64) for key in ("input_ids", "attention_mask")}


def text_dataset(split: TextSet, tokenizer, max_length: int):
    """A MONAI dataset of ``{"input_ids", "attention_mask", "label", "text_id"}`` items (no random steps)."""
    from monai.data import Dataset
    from monai.transforms import Compose

    tokens = encode(split.texts, tokenizer, max_length)
    items = [
        {"input_ids": ids, "attention_mask": mask, "label": int(label), "text_id": text_id}
        for ids, mask, label, text_id in zip(tokens["input_ids"], tokens["attention_mask"], split.labels, split.ids)
    ]
    return Dataset(items, Compose([]))
