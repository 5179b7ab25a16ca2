"""A resumable, distributed sampler: the data position is (epoch, batch), not an iterator state.

Each epoch is a permutation drawn from ``(seed, epoch)``, padded to a multiple of ``batch_size * world_size`` and
split by rank, so every rank sees the same number of batches. Resuming at (epoch, batch) re-creates exactly the
indices an uninterrupted run would have used next, without loading the skipped samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Indices of one epoch for one rank, starting at batch ``start_batch``.

    Example: 10 studies, batch 4, 2 ranks -> the permutation is padded to 16, rank 0 gets positions 0, 2, 4, ...
    and yields 2 batches of 4 per epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        if num_samples < 1:
            raise ValueError("the sampler needs at least one sample (is the cache or split empty?)")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        per_step = self.batch_size * self.world_size
        if self.drop_last and self.num_samples >= per_step:
            return self.num_samples // per_step
        return -(-self.num_samples // per_step)

    def set_position(self, epoch: int, batch: int) -> None:
        """Start the next iteration at batch ``batch`` of epoch ``epoch``."""
        self.epoch, self.start_batch = epoch, batch

    def _epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_samples)
        total = self.batches_per_epoch * self.batch_size * self.world_size
        reps = -(-total // self.num_samples)
        return np.tile(order, reps)[:total]

    def __iter__(self) -> Iterator[int]:
        mine = self._epoch_indices()[self.rank :: self.world_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
