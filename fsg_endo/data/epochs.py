"""Per-item augmentation seeds: each training item is augmented from a seed fixed by (seed, epoch, position).

Position is the item's place in the epoch's global order, before the split across processes. So the
augmentation of an item does not depend on the number of DataLoader workers, on the number of
processes, nor on where a run was resumed: an interrupted run and an uninterrupted one see the same crops.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from fsg_endo.data.pipeline import seed_augmentation
from fsg_endo.data.sampling import LesionFrameSampler

_AUGMENT_STREAM = 1  # keeps the item seeds apart from the sampler's own draw of (seed, epoch)


class EpochSampler(Sampler[tuple[int, int]]):
    """``(item seed, row index)`` pairs of a :class:`LesionFrameSampler`, from position ``start`` of this
    rank's share of the epoch on (``start`` > 0 resumes an epoch after its first items)."""

    def __init__(self, sampler: LesionFrameSampler, seed: int = 0) -> None:
        self.sampler, self.seed = sampler, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch to yield, skipping this rank's first ``start`` items."""
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)
        replicas, rank = self.sampler.num_replicas, self.sampler.rank
        seeds = np.random.default_rng([self.seed, self.epoch, _AUGMENT_STREAM]).integers(
            0, 2**32 - 1, size=len(indices) * replicas, dtype=np.uint32
        )
        for j in range(self.start, len(indices)):
            yield int(seeds[rank + j * replicas]), indices[j]

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


class SeededItems(Dataset):
    """A MONAI dataset indexed by ``(seed, index)``: reseeds the random transforms, then returns ``dataset[index]``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        seed_augmentation(self.dataset, seed)
        return self.dataset[index]
