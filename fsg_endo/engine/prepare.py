"""From a data config to ready loaders: dataset (generated and cached if synthetic), manifest, splits.

The polyp tasks and the pretraining corpus live here; the image and text classification tasks read their data
in :mod:`fsg_endo.engine.class_data`. Every task's data arrives as one :class:`~fsg_endo.engine.bundle.DataBundle`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fsg_endo.data.corpus import (
    FRAME_COLUMNS,
    crop_rows,
    frame_table,
    log_uniform_sides,
    relative_sides,
    video_folds,
)
from fsg_endo.data.epochs import EpochSampler, SeededItems
from fsg_endo.data.manifest import build_manifest, load_manifest, write_manifest
from fsg_endo.data.pipeline import build_dataset, compute_mean_std, make_loader
from fsg_endo.data.sampling import LesionFrameSampler
from fsg_endo.data.splits import make_splits, split_summary
from fsg_endo.engine.bundle import DataBundle, check_batch, split_seed
from fsg_endo.engine.class_data import prepare_image_data, prepare_text_data
from fsg_endo.engine.progress import interactive
from fsg_endo.engine.schema import Config, Data
from fsg_endo.errors import FsgEndoError

CLASS_DATA = {"image_class": prepare_image_data, "text_class": prepare_text_data}  # their own data, their own room


def cache_dir() -> Path:
    """Where generated datasets and manifests live: ``$FSG_ENDO_CACHE`` or ``.cache/fsg_endo``."""
    return Path(os.environ.get("FSG_ENDO_CACHE", ".cache/fsg_endo"))


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


@dataclass
class Splits:
    """The rows of one run: dataset root, manifest hash, and the train/val/test rows (evaluation capped)."""

    root: Path
    manifest_sha256: str
    splits: dict[str, pd.DataFrame]
    manifest: Path | None = None


def prepare_splits(cfg: Config) -> Splits:
    """Dataset (generated on first use), manifest and the low-data split of a config, without any crop."""
    data, seed = cfg.data, split_seed(cfg)
    if data.source == "frames":
        return frame_folder_splits(cfg)
    root = dataset_root(data, cfg.seed)
    mpath = manifest_path(data, root, seed)
    manifest = load_manifest(mpath, root=root)
    splits = make_splits(manifest, data.test_fold, data.val_fold, data.train_fraction, seed=seed)
    for name in ("val", "test"):
        splits[name] = cap_frames_per_lesion(splits[name], data.eval_frames_per_lesion)
    if cfg.task == "pretrain_mae":
        splits = pretraining_crops(splits, cfg.pretrain.crops_per_frame, seed)
    return Splits(root, hashlib.sha256(mpath.read_bytes()).hexdigest(), splits, mpath)


def frame_folder_splits(cfg: Config) -> Splits:
    """Task ``pretrain_mae`` on a folder of unlabelled frames (``data.root``, one subfolder per video): whole
    videos to folds, then crops whose sides are drawn from ``pretrain.crop_sides``."""
    data, seed = cfg.data, split_seed(cfg)
    root = dataset_root(data, cfg.seed)
    frames = frame_table(root)
    frames = frames.assign(fold=video_folds(frames, data.folds, seed), lesion_id=frames["frame_id"], size_class3=-1)
    splits = make_splits(frames, data.test_fold, data.val_fold, data.train_fraction, seed=seed)
    sides = log_uniform_sides(*cfg.pretrain.crop_sides, seed=seed)
    corpus = pretraining_crops(splits, cfg.pretrain.crops_per_frame, seed, sides)
    return Splits(root, hashlib.sha256(frames.to_csv(index=False).encode()).hexdigest(), corpus)


def pretraining_crops(
    splits: Mapping[str, pd.DataFrame], crops_per_frame: int, seed: int, sides: np.ndarray | None = None
) -> dict[str, pd.DataFrame]:
    """The pretraining corpus of each split: ``crops_per_frame`` crop boxes per frame, sized like the training
    split's boxes (or drawn from ``sides``) and placed in the field of view
    (:func:`fsg_endo.data.corpus.crop_rows`); no sizes, no classes."""
    sides = relative_sides(splits["train"]) if sides is None else sides
    corpus = {}
    for i, (name, rows) in enumerate(splits.items()):
        frames = rows.drop_duplicates("frame_path")[list(FRAME_COLUMNS)]
        crops = crop_rows(
            frames, sides, crops_per_frame, seed=int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        )
        corpus[name] = crops.assign(size_class3=-1, size_class2=-1)
    return corpus


def prepare_data(cfg: Config, num_replicas: int = 1, rank: int = 0) -> DataBundle:
    """Dataset, manifest, low-data split, train statistics, datasets and loaders for one run.

    With ``num_replicas`` processes, ``optim.batch_size`` is the global batch: this rank loads its
    share of every batch, and only rank 0 (which evaluates) gets the val and test loaders.
    """
    if cfg.task in CLASS_DATA:
        return CLASS_DATA[cfg.task](cfg, num_replicas, rank)
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
        loaders=loaders,
        sampler=sampler,
        splits=splits,
        summary=split_summary(splits),
        source=rows.manifest or root,
        source_name=rows.manifest.stem if rows.manifest else data.source,
        tags={"data.manifest_sha256": rows.manifest_sha256},
        preprocess=dict(crop, mean=list(mean), std=list(std)),
    )
