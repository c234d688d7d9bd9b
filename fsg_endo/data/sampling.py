"""Per-epoch lesion-level sampling: N frames per lesion, so long videos don't dominate (paper: N = 40)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pandas as pd
from torch.utils.data import Sampler

from fsg_endo.data.sizes import size_class3
from fsg_endo.errors import FsgEndoError


class LesionFrameSampler(Sampler[int]):
    """Row indices of ``rows``: each epoch draws ``frames_per_lesion`` frames of every lesion (without
    replacement when the lesion has that many, else with), shuffled.

    ``class_balanced=True`` first redraws the lesions so every size class (``size_class3``) gets the same
    number of lesion draws. The draw is a function of (seed, epoch) only (:meth:`set_epoch`), so a resumed
    run sees the same epochs. ``num_replicas``/``rank`` split an epoch like ``DistributedSampler`` (every
    k-th index, padded to equal length). ``frames_per_lesion=None`` takes every frame once.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        frames_per_lesion: int | None = 40,
        class_balanced: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(rows) == 0:
            raise FsgEndoError("cannot sample training frames: no training rows")
        if frames_per_lesion is not None and frames_per_lesion < 1:
            raise FsgEndoError(f"frames_per_lesion must be >= 1 or None, not {frames_per_lesion}")
        if class_balanced and frames_per_lesion is None:
            raise FsgEndoError("class-balanced sampling needs a number of frames per lesion, not None")
        if not 0 <= rank < num_replicas:
            raise FsgEndoError(f"sampler rank {rank} is not in [0, {num_replicas})")
        lesions = pd.Series(np.arange(len(rows)), index=rows["lesion_id"].to_numpy()).groupby(level=0, sort=True)
        self.lesion_ids = list(lesions.groups)
        self.frames = [group.to_numpy() for _, group in lesions]
        first = rows["size_mm"].to_numpy()[[f[0] for f in self.frames]]
        self.lesion_class = np.atleast_1d(size_class3(first))
        self.frames_per_lesion = frames_per_lesion
        self.class_balanced = class_balanced
        self.seed, self.epoch = seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        n_classes = len(np.unique(self.lesion_class))
        self.n_lesion_draws = (
            math.ceil(len(self.frames) / n_classes) * n_classes if class_balanced else len(self.frames)
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw the next iteration yields."""
        self.epoch = epoch

    def _lesion_draws(self, rng: np.random.Generator) -> np.ndarray:
        """Lesion positions for one epoch: each once, or an equal number per size class when balanced."""
        if not self.class_balanced:
            return np.arange(len(self.frames))
        classes = np.unique(self.lesion_class)
        per_class = self.n_lesion_draws // len(classes)
        draws = []
        for c in classes:
            members = np.flatnonzero(self.lesion_class == c)
            # whole shuffled passes over the class, so every member appears floor or ceil(per_class / size)
            passes = [rng.permutation(members) for _ in range(math.ceil(per_class / len(members)))]
            draws.append(np.concatenate(passes)[:per_class])
        return np.concatenate(draws)

    def _frame_draws(self, rng: np.random.Generator, lesion: int) -> np.ndarray:
        frames, n = self.frames[lesion], self.frames_per_lesion
        if n is None:
            return frames
        return rng.choice(frames, size=n, replace=len(frames) < n)

    def epoch_indices(self) -> np.ndarray:
        """All row indices of the current epoch, before the split across replicas."""
        rng = np.random.default_rng([self.seed, self.epoch])
        picks = np.concatenate([self._frame_draws(rng, lesion) for lesion in self._lesion_draws(rng)])
        return rng.permutation(picks)

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        padded = np.resize(indices, len(self) * self.num_replicas)  # repeats the head, as DistributedSampler
        return iter(padded[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        total = (
            sum(len(f) for f in self.frames)
            if self.frames_per_lesion is None
            else self.n_lesion_draws * self.frames_per_lesion
        )
        return math.ceil(total / self.num_replicas)
