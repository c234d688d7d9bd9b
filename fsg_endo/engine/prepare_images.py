"""Data of the ``image_class`` task: an image source read into memory -> train / val / test loaders.

The training images read (``data.train_fraction``, ``data.train_limit``, class-stratified) are split into
``data.folds`` stratified folds; fold ``data.val_fold`` validates (best epoch), the rest trains. The test
split is the dataset's own held-out set (MNIST t10k, Imagenette val/, CIFAR-100 test), read at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import DistributedSampler

from fsg_endo.data.epochs import EpochSampler, SeededItems
from fsg_endo.data.image_folders import (
    ImageData,
    ImageSet,
    channel_stats,
    check_image_root,
    image_dataset,
    load_cifar100,
    load_image_folder,
    load_mnist,
    validation_split,
)
from fsg_endo.data.pipeline import make_loader
from fsg_endo.engine.prepare import DataBundle, check_batch

FALLBACKS = {"sklearn_digits"}  # sources read in place of the configured one


def read_images(data: Mapping[str, Any], seed: int, train: bool = True) -> ImageData:
    """The configured image source, reduced as configured (``train=False``: the held-out split only)."""
    common = dict(image_size=data["image_size"], seed=seed, fraction=data["train_fraction"],
                  train_limit=data["train_limit"], test_limit=data["test_limit"], train=train)
    if data["source"] == "mnist":
        return load_mnist(data["root"], **common)
    check_image_root(data["source"], data["root"])
    reader = load_image_folder if data["source"] == "imagenette" else load_cifar100
    return reader(data["root"], **common)


def split_table(splits: Mapping[str, ImageSet]) -> pd.DataFrame:
    """One row per image: split, id, label (its hash identifies the data of a run)."""
    return pd.concat([pd.DataFrame({"split": name, "image_id": s.ids, "label": s.labels.numpy()})
                      for name, s in splits.items()], ignore_index=True)


def prepare_image_data(cfg: Mapping[str, Any], num_replicas: int = 1, rank: int = 0) -> DataBundle:
    """Read, split and normalise (train statistics) the images; loaders as :func:`prepare_data` builds them."""
    check_batch(cfg, num_replicas)
    data, seed, batch = cfg["data"], cfg["seed"], cfg["optim"]["batch_size"]
    images = read_images(data, seed)
    train, val = validation_split(images.train, data["folds"], data["val_fold"], seed)
    splits = {"train": train, "val": val, "test": images.test}
    mean, std = channel_stats(train.images)
    augment = {"shift": data["shift"], "flip": data["flip"]} if data["augment"] else {}
    train_ds = SeededItems(image_dataset(train, mean, std, **augment))
    sampler = EpochSampler(DistributedSampler(train_ds, num_replicas, rank, shuffle=True, seed=seed), seed=seed)
    loaders = {"train": make_loader(train_ds, batch // num_replicas, sampler=sampler, workers=data["workers"],
                                    seed=seed)}
    for name in ("val", "test") if rank == 0 else ():
        loaders[name] = make_loader(image_dataset(splits[name], mean, std), batch * 2, workers=data["workers"],
                                    seed=seed)
    table = split_table(splits)
    summary = table.groupby("split", sort=False).agg(images=("image_id", "size"),
                                                     classes=("label", "nunique")).reset_index()
    info = {"source_read": images.source, "class_names": list(images.class_names), "mean": list(mean),
            "std": list(std), **{f"n_{name}": len(s) for name, s in splits.items()}}
    tags = {"data.source_read": images.source,
            "data.fallback": images.source if images.source in FALLBACKS else "none"}
    return DataBundle(root=Path(data["root"] or "."),
                      manifest_sha256=hashlib.sha256(table.to_csv(index=False).encode()).hexdigest(),
                      splits={name: table[table["split"] == name] for name in splits}, summary=summary,
                      sampler=sampler, loaders=loaders, class_names=images.class_names, tags=tags, info=info,
                      note=images.note)
