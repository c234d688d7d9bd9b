"""The data of the classification tasks of a dataset's own classes: ``image_class`` and ``text_class``.

Task ``image_class`` reads an image source into memory (:func:`prepare_image_data`): the training images read
(``data.train_fraction``, ``data.train_limit``, class-stratified) are split into ``data.folds`` stratified folds,
fold ``data.val_fold`` validates and the rest trains; the test split is the dataset's own held-out set (MNIST t10k,
Imagenette val/, CIFAR-100 test). Task ``text_class`` does the same with texts (:func:`prepare_text_data`),
tokenised once by the model's tokenizer; its test split is the CSV's ``split == test`` rows (else fold
``data.test_fold``) or the Hugging Face dataset's test split. No manifest, no lesions, no boxes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import DistributedSampler

from fsg_endo.data.cifar100 import cifar_folder, load_cifar100
from fsg_endo.data.epochs import EpochSampler, SeededItems
from fsg_endo.data.image_folders import (
    ImageData,
    channel_stats,
    folder_classes,
    image_dataset,
    load_image_folder,
    load_mnist,
    validation_split,
)
from fsg_endo.data.pipeline import make_loader
from fsg_endo.data.text import TextData, load_tokenizer, read_hf_dataset, read_text_csv, text_dataset
from fsg_endo.engine.bundle import DataBundle, check_batch, split_seed
from fsg_endo.engine.schema import Config, Data
from fsg_endo.errors import FsgEndoError

FALLBACKS = {"sklearn_digits"}  # sources read in place of the configured one


def check_image_root(source: str, root: str | os.PathLike | None) -> None:
    """Raise the one-line error a reader would, without reading images (MNIST falls back, never fails here)."""
    if source == "mnist":
        return
    if not root:
        raise FsgEndoError(f"data.source={source} needs a dataset root (--data-root or data.root)")
    if source == "imagenette":
        folder_classes(Path(root))
    elif source == "cifar100":
        cifar_folder(Path(root))
    else:
        raise FsgEndoError(f"data.source={source}: not an image source (mnist, imagenette, cifar100)")


def read_images(data: Data, seed: int, train: bool = True) -> ImageData:
    """The configured image source, reduced as configured (``train=False``: the held-out split only)."""
    common = dict(
        image_size=data.image_size,
        seed=seed,
        fraction=data.train_fraction,
        train_limit=data.train_limit,
        test_limit=data.test_limit,
        train=train,
    )
    if data.source == "mnist":
        return load_mnist(data.root, **common)
    check_image_root(data.source, data.root)
    reader = load_image_folder if data.source == "imagenette" else load_cifar100
    return reader(data.root, **common)


def split_table(splits: Mapping[str, Any], id_column: str = "image_id") -> pd.DataFrame:
    """One row per item (image or text): split, id, label (its hash identifies the data of a run)."""
    return pd.concat(
        [pd.DataFrame({"split": name, id_column: s.ids, "label": s.labels.numpy()}) for name, s in splits.items()],
        ignore_index=True,
    )


def in_memory_bundle(
    cfg: Config,
    datasets: Mapping[str, Any],
    table: pd.DataFrame,
    num_replicas: int,
    rank: int,
    tags: Mapping[str, str],
    **fields: Any,
) -> DataBundle:
    """Loaders over in-memory datasets (``train``, ``val``, ``test``; rank 0 evaluates), the table of their items
    (its column after ``split`` names them; its hash is the tag ``data.table_sha256``) and its summary, in a
    :class:`DataBundle` with ``tags`` and ``fields``."""
    data, seed, batch = cfg.data, cfg.seed, cfg.optim.batch_size
    train_ds = SeededItems(datasets["train"])
    sampler = EpochSampler(DistributedSampler(train_ds, num_replicas, rank, shuffle=True, seed=seed), seed=seed)
    loaders = {"train": make_loader(train_ds, batch // num_replicas, sampler=sampler, workers=data.workers, seed=seed)}
    for name in ("val", "test") if rank == 0 else ():
        loaders[name] = make_loader(datasets[name], batch * 2, workers=data.workers, seed=seed)
    id_column = table.columns[1]
    counts = {id_column.removesuffix("_id") + "s": (id_column, "size"), "classes": ("label", "nunique")}
    table_sha256 = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
    return DataBundle(
        loaders=loaders,
        sampler=sampler,
        splits={name: table[table["split"] == name] for name in datasets},
        summary=table.groupby("split", sort=False).agg(**counts).reset_index(),
        source=Path(data.root or "."),
        source_name=data.source,
        tags={"data.table_sha256": table_sha256, **tags},
        **fields,
    )


def prepare_image_data(cfg: Config, num_replicas: int = 1, rank: int = 0) -> DataBundle:
    """Read, split and normalise (train statistics) the images; loaders as :func:`prepare_data` builds them."""
    check_batch(cfg, num_replicas)
    data, seed = cfg.data, split_seed(cfg)
    images = read_images(data, seed)
    train, val = validation_split(images.train, data.folds, data.val_fold, seed)
    splits = {"train": train, "val": val, "test": images.test}
    mean, std = channel_stats(train.images)
    augment = {"shift": data.shift, "flip": data.flip} if data.augment else {}
    datasets = {name: image_dataset(s, mean, std, **(augment if name == "train" else {})) for name, s in splits.items()}
    info = {
        "source_read": images.source,
        "class_names": list(images.class_names),
        "mean": list(mean),
        "std": list(std),
        **{f"n_{name}": len(s) for name, s in splits.items()},
    }
    tags = {"data.source_read": images.source, "data.fallback": images.source if images.source in FALLBACKS else "none"}
    return in_memory_bundle(
        cfg,
        datasets,
        split_table(splits),
        num_replicas,
        rank,
        class_names=images.class_names,
        tags=tags,
        files={"data.json": info},
        note=images.note,
        preprocess={"image_size": data.image_size, "mean": list(mean), "std": list(std)},
    )


def read_texts(data: Data, seed: int) -> TextData:
    """The configured text source (the user's CSV or a Hugging Face dataset), reduced as configured."""
    common = dict(
        text_column=data.text_column,
        label_column=data.label_column,
        seed=seed,
        fraction=data.train_fraction,
        train_limit=data.train_limit,
        test_limit=data.test_limit,
    )
    if data.source == "hf_dataset":
        return read_hf_dataset(data.root, **common)
    return read_text_csv(data.root, folds=data.folds, test_fold=data.test_fold, **common)


def prepare_text_data(cfg: Config, num_replicas: int = 1, rank: int = 0) -> DataBundle:
    """Read and split the texts, tokenise them with the model's tokenizer; loaders as :func:`prepare_data`."""
    check_batch(cfg, num_replicas)
    data, seed, hf_model = cfg.data, split_seed(cfg), cfg.model.hf_model
    texts = read_texts(data, seed)
    train, val = validation_split(texts.train, data.folds, data.val_fold, seed)
    splits = {"train": train, "val": val, "test": texts.test}
    tokenizer = load_tokenizer(hf_model)
    datasets = {name: text_dataset(s, tokenizer, data.max_length) for name, s in splits.items()}
    preprocess = {"hf_model": hf_model, "max_length": data.max_length}
    info = {
        "source_read": texts.source,
        "class_names": list(texts.class_names),
        **preprocess,
        **{f"n_{name}": len(s) for name, s in splits.items()},
    }
    return in_memory_bundle(
        cfg,
        datasets,
        split_table(splits, "text_id"),
        num_replicas,
        rank,
        class_names=texts.class_names,
        tags={"data.source_read": texts.source, "data.fallback": "none"},
        files={"data.json": info},
        note=texts.note,
        preprocess=preprocess,
    )
