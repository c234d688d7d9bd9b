"""What every run's data gives the training loop and the run's record: one bundle, the same fields for every task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fsg_endo.data.epochs import EpochSampler
from fsg_endo.engine.schema import Config
from fsg_endo.errors import FsgEndoError


@dataclass
class DataBundle:
    """The data of one run (of one process under torchrun), whatever the task.

    ``splits`` holds the rows of each split (polyp tasks: manifest rows; image and text tasks: one row per item),
    ``source`` / ``source_name`` what they were read from (the manifest, or the dataset root and source: the
    MLflow dataset inputs), ``tags`` what the run records of them (a content hash such as ``data.manifest_sha256``
    or ``data.table_sha256``, the source actually read), ``files`` the JSON artifacts of the run folder (the class
    tasks' ``data.json``: what inference needs), ``class_names`` the classes the data defines (the polyp tasks'
    classes are the task's own: none here).
    """

    loaders: dict[str, Any]
    sampler: EpochSampler
    splits: dict[str, pd.DataFrame]
    summary: pd.DataFrame  # per split: counts (data/split_summary.csv)
    source: Path
    source_name: str
    tags: dict[str, str]
    preprocess: dict[str, Any]  # crop size, normalisation, tokenizer: what a saved model needs
    class_names: tuple[str, ...] = ()
    note: str = ""  # a line for the user, e.g. why a fallback was read
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """Draw epoch ``epoch`` and skip its first ``batches_done`` batches (a run resumed mid-epoch)."""
        self.sampler.set_epoch(epoch, start=batches_done * self.loaders["train"].batch_size)


def check_batch(cfg: Config, num_replicas: int) -> None:
    """``optim.batch_size`` is the global batch: it must split evenly across the training processes."""
    batch = cfg.optim.batch_size
    if batch % num_replicas:
        raise FsgEndoError(f"optim.batch_size = {batch} is not divisible by the {num_replicas} training processes")


def split_seed(cfg: Config) -> int:
    """The seed of the folds and the low-data split: ``data.split_seed``, else ``seed``."""
    return cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
