"""Which samples go in which batch: seeded order per epoch, resuming, sharding across ranks.

Global batch ``g`` (counted across epochs from 0) holds ``batch_size x world_size`` samples of
epoch ``g // batches_per_epoch``; rank ``r`` gets the ``r``-th contiguous part, so the ranks'
batches concatenated in rank order are exactly the batch one process with ``world_size=1`` and
``batch_size x world_size`` would see. Starting at global batch ``start_batch`` gives exactly the
batches a run that never stopped would have seen from there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np


class BatchSchedule:
    """The global batches of a set of sample ids.

    Args:
        ids: (N,) int64 sample ids (the split).
        batch_size: samples per rank and batch.
        world_size, rank: this process's share of each global batch.
        seed: order seed; epoch ``e`` permutes ``ids`` with ``default_rng([seed, e, ...])``.
        shuffle: permute per epoch (else the ids' order every epoch).
        drop_last: drop an epoch's last, short global batch.
        epochs: number of epochs, or None for endless iteration.
        start_batch: the first global batch to yield.
    """

    def __init__(
        self,
        ids,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        epochs: int | None = 1,
        start_batch: int = 0,
    ):
        self.ids = np.asarray(ids, dtype=np.int64)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epochs, self.start_batch = epochs, start_batch
        self.global_size = batch_size * world_size
        n = len(self.ids)
        self.batches_per_epoch = (
            n // self.global_size if drop_last else math.ceil(n / self.global_size)
        )
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{n} samples make no global batch of {self.global_size} (batch_size "
                f"{batch_size} x world_size {world_size}) with drop_last=True"
            )
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def total(self) -> int | None:
        """Global batches in all epochs (None when endless)."""
        return None if self.epochs is None else self.epochs * self.batches_per_epoch

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("an endless schedule (epochs=None) has no length")
        return max(0, self.total - self.start_batch)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch), 0x5EED])
            order = self.ids[rng.permutation(len(self.ids))]
        else:
            order = self.ids
        self._order_cache = (epoch, order)
        return order

    def global_batch(self, g: int) -> tuple[int, np.ndarray]:
        """(epoch, sample ids of global batch ``g``)."""
        epoch, i = divmod(int(g), self.batches_per_epoch)
        order = self.order(epoch)
        return epoch, order[i * self.global_size : (i + 1) * self.global_size]

    def local(self, global_ids: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (parts differ by at most one)."""
        if len(global_ids) == self.global_size:
            return global_ids[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return np.array_split(global_ids, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[int]:
        """Global batch indices from ``start_batch`` on."""
        stop = self.total
        return (
            iter(range(self.start_batch, stop))
            if stop is not None
            else itertools.count(self.start_batch)
        )
