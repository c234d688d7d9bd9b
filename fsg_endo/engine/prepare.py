"""From a data config to ready loaders: dataset (generated and cached if synthetic), manifest, splits.

Task ``image_class`` reads an image source into memory instead (:func:`prepare_image_data`): the training images
read (``data.train_fraction``, ``data.train_limit``, class-stratified) are split into ``data.folds`` stratified
folds, fold ``data.val_fold`` validates and the rest trains; the test split is the dataset's own held-out set
(MNIST t10k, Imagenette val/, CIFAR-100 test).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
from fsg_endo.data.manifest import build_manifest, load_manifest, write_manifest
from fsg_endo.data.pipeline import build_dataset, compute_mean_std, make_loader
from fsg_endo.data.sampling import LesionFrameSampler
from fsg_endo.data.splits import make_splits, split_summary
from fsg_endo.engine.progress import interactive
from fsg_endo.engine.schema import Config, Data
from fsg_endo.errors import FsgEndoError


def cache_dir() -> Path:
    """Where generated datasets and manifests live: ``$FSG_ENDO_CACHE`` or ``.cache/fsg_endo``."""
    return Path(os.environ.get("FSG_ENDO_CACHE", ".cache/fsg_endo"))


@dataclass
class DataBundle:
    """Everything the training loop needs from the data side of one run (of one process under torchrun)."""

    root: Path
    manifest_sha256: str
    splits: dict[str, pd.DataFrame]
    summary: pd.DataFrame
    sampler: EpochSampler
    loaders: dict[str, Any]
    class_names: tuple[str, ...] = ()  # image_class: the classes read from the data (the task's outputs)
    tags: dict[str, str] = field(default_factory=dict)  # MLflow tags saying what was read, e.g. a fallback
    info: dict[str, Any] = field(default_factory=dict)  # image_class: what inference needs (data.json)
    note: str = ""  # a line for the user, e.g. why a fallback was used
    manifest: Path | None = None  # the manifest the rows come from (polyp data)
    preprocess: dict[str, Any] = field(default_factory=dict)  # crop size, normalisation: what a saved model needs

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """Draw epoch ``epoch`` and skip its first ``batches_done`` batches (a run resumed mid-epoch)."""
        self.sampler.set_epoch(epoch, start=batches_done * self.loaders["train"].batch_size)


def dataset_root(data: Data, seed: int) -> Path:
    """The dataset root of a config; generates the synthetic dataset on first use."""
    if data.source != "synthetic":
        if not data.root:
            raise FsgEndoError(f"data.source={data.source} needs a dataset root (--data-root or data.root)")
        root = Path(data.root)
        if not root.is_dir():
            raise FsgEndoError(f"{root}: dataset root does not exist")
        return root
    from fsg_endo.synth.dataset import ensure_synthetic

    gen_seed = seed if data.synthetic_seed is None else data.synthetic_seed
    root = Path(data.root) if data.root else cache_dir() / f"synthetic_s{gen_seed}_v{data.videos or 'default'}"
    return ensure_synthetic(root, n_videos=data.videos, seed=gen_seed)


def dataset_stamp(root: Path) -> str:
    """A dataset's version: the synthetic generator's record of it, else the modification times of the root's
    entries (a regenerated or edited dataset then gets a new manifest, not a stale cached one)."""
    record = root / "synthetic.json"
    if record.is_file():
        return record.read_text(encoding="utf-8")
    return ",".join(str(p.stat().st_mtime_ns) for p in sorted(root.iterdir()))


def manifest_path(data: Data, root: Path, seed: int) -> Path:
    """The manifest of a config: the one given, else one built from the root and cached by content key."""
    if data.manifest:
        return Path(data.manifest)
    key = hashlib.sha1(f"{data.source}|{root.resolve()}|{data.sizes}|{dataset_stamp(root)}".encode())
    key = key.hexdigest()[:10]
    path = cache_dir() / "manifests" / f"{data.source}_{key}_k{data.folds}_s{seed}.csv"
    if not path.exists():
        df = build_manifest(data.source, root, folds=data.folds, seed=seed, sizes=data.sizes)
        write_manifest(df, path)
    return path


def cap_frames_per_lesion(rows: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """Keep at most ``n`` evenly spaced frames of each lesion (deterministic; cheaper evaluation)."""
    if not n:
        return rows
    keep = [
        idx[np.unique(np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int))]
        for idx in rows.groupby("lesion_id", sort=False).indices.values()
    ]
    return rows.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def check_batch(cfg: Config, num_replicas: int) -> None:
    """``optim.batch_size`` is the global batch: it must split evenly across the training processes."""
    batch = cfg.optim.batch_size
    if batch % num_replicas:
        raise FsgEndoError(f"optim.batch_size = {batch} is not divisible by the {num_replicas} training processes")


@dataclass
class Splits:
    """The rows of one run: dataset root, manifest hash, and the train/val/test rows (evaluation capped)."""

    root: Path
    manifest_sha256: str
    splits: dict[str, pd.DataFrame]
    manifest: Path | None = None


def split_seed(cfg: Config) -> int:
    """The seed of the folds and the low-data split: ``data.split_seed``, else ``seed``."""
    return cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed


def prepare_splits(cfg: Config) -> Splits:
    """Dataset (generated on first use), manifest and the low-data split of a config, without any crop."""
    data, seed = cfg.data, split_seed(cfg)
    root = dataset_root(data, cfg.seed)
    mpath = manifest_path(data, root, seed)
    manifest = load_manifest(mpath, root=root)
    splits = make_splits(manifest, data.test_fold, data.val_fold, data.train_fraction, seed=seed)
    for name in ("val", "test"):
        splits[name] = cap_frames_per_lesion(splits[name], data.eval_frames_per_lesion)
    return Splits(root, hashlib.sha256(mpath.read_bytes()).hexdigest(), splits, mpath)


def prepare_data(cfg: Config, num_replicas: int = 1, rank: int = 0) -> DataBundle:
    """Dataset, manifest, low-data split, train statistics, datasets and loaders for one run.

    With ``num_replicas`` processes, ``optim.batch_size`` is the global batch: this rank loads its
    share of every batch, and only rank 0 (which evaluates) gets the val and test loaders.
    """
    if cfg.task == "image_class":
        return prepare_image_data(cfg, num_replicas, rank)
    check_batch(cfg, num_replicas)
    data, seed = cfg.data, cfg.seed
    batch = cfg.optim.batch_size
    rows = prepare_splits(cfg)
    root, splits = rows.root, rows.splits

    crop = {"image_size": data.image_size, "context": data.context, "fov_mask": data.fov_mask}
    mean, std = compute_mean_std(splits["train"], root, **crop)
    common = dict(
        crop,
        mean=mean,
        std=std,
        cache=data.cache,
        source=data.source_media,
        cache_dir=cache_dir() / "persistent",
        workers=data.workers,
        progress=interactive(),
    )
    train_ds = SeededItems(
        build_dataset(splits["train"], root, train=data.augment, seed=seed, photometric=data.photometric, **common)
    )
    sampler = EpochSampler(
        LesionFrameSampler(
            splits["train"],
            frames_per_lesion=data.frames_per_lesion,
            class_balanced=data.class_balanced,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        ),
        seed=seed,
    )
    loaders = {"train": make_loader(train_ds, batch // num_replicas, sampler=sampler, workers=data.workers, seed=seed)}
    for name in ("val", "test") if rank == 0 else ():
        ds = build_dataset(splits[name], root, train=False, seed=seed, **common)
        loaders[name] = make_loader(ds, batch * 2, workers=data.workers, seed=seed)
    return DataBundle(
        root=root,
        manifest_sha256=rows.manifest_sha256,
        splits=splits,
        summary=split_summary(splits),
        sampler=sampler,
        loaders=loaders,
        manifest=rows.manifest,
        preprocess=dict(crop, mean=list(mean), std=list(std)),
    )


FALLBACKS = {"sklearn_digits"}  # sources read in place of the configured one


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


def split_table(splits: Mapping[str, ImageSet]) -> pd.DataFrame:
    """One row per image: split, id, label (its hash identifies the data of a run)."""
    return pd.concat(
        [pd.DataFrame({"split": name, "image_id": s.ids, "label": s.labels.numpy()}) for name, s in splits.items()],
        ignore_index=True,
    )


def prepare_image_data(cfg: Config, num_replicas: int = 1, rank: int = 0) -> DataBundle:
    """Read, split and normalise (train statistics) the images; loaders as :func:`prepare_data` builds them."""
    check_batch(cfg, num_replicas)
    data, seed, batch = cfg.data, cfg.seed, cfg.optim.batch_size
    images = read_images(data, split_seed(cfg))
    train, val = validation_split(images.train, data.folds, data.val_fold, split_seed(cfg))
    splits = {"train": train, "val": val, "test": images.test}
    mean, std = channel_stats(train.images)
    augment = {"shift": data.shift, "flip": data.flip} if data.augment else {}
    train_ds = SeededItems(image_dataset(train, mean, std, **augment))
    sampler = EpochSampler(DistributedSampler(train_ds, num_replicas, rank, shuffle=True, seed=seed), seed=seed)
    loaders = {"train": make_loader(train_ds, batch // num_replicas, sampler=sampler, workers=data.workers, seed=seed)}
    for name in ("val", "test") if rank == 0 else ():
        loaders[name] = make_loader(image_dataset(splits[name], mean, std), batch * 2, workers=data.workers, seed=seed)
    table = split_table(splits)
    summary = (
        table.groupby("split", sort=False).agg(images=("image_id", "size"), classes=("label", "nunique")).reset_index()
    )
    info = {
        "source_read": images.source,
        "class_names": list(images.class_names),
        "mean": list(mean),
        "std": list(std),
        **{f"n_{name}": len(s) for name, s in splits.items()},
    }
    tags = {"data.source_read": images.source, "data.fallback": images.source if images.source in FALLBACKS else "none"}
    return DataBundle(
        root=Path(data.root or "."),
        manifest_sha256=hashlib.sha256(table.to_csv(index=False).encode()).hexdigest(),
        splits={name: table[table["split"] == name] for name in splits},
        summary=summary,
        sampler=sampler,
        loaders=loaders,
        class_names=images.class_names,
        tags=tags,
        info=info,
        note=images.note,
        preprocess={"image_size": data.image_size, "mean": list(mean), "std": list(std)},
    )
