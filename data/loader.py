"""Batches for one rank: a seeded, sharded, resumable order, and reproducibly seeded workers.

Epochs: the returned loader's ``batch_sampler`` is a :class:`ShardedBatchSampler`; call
``loader.batch_sampler.set_epoch(epoch)`` before iterating each epoch (as with ``DistributedSampler``), or
build a new loader per epoch (cheap: nothing is re-read). The epoch travels inside every
:class:`~data.base.SampleKey` the sampler yields, so persistent workers see it too.

Resuming: ``set_epoch(epoch, start_batch=k)`` (or ``build_loader(..., start_batch=k)``) yields exactly the
batches that an uninterrupted epoch would have yielded from batch ``k`` on, augmentation included, because
the order depends only on (seed, epoch) and each sample's augmentation only on (seed, epoch, index).

PopTorch: wrap the loader in ``poptorch.AsynchronousDataAccessor`` if wanted; it iterates a pickled copy, so
build a new loader for each epoch rather than calling ``set_epoch`` on the original.
"""

from __future__ import annotations

import functools
import random
from typing import Iterator, List

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from data.base import ImageDataset, SampleKey
from data.errors import DataError
from data.seeding import derive_seed
from data.worker_signals import ignore_stop_signals


class ShardedBatchSampler(Sampler[List[SampleKey]]):
    """This rank's batches of :class:`SampleKey`.

    Each rank takes a disjoint, equal-size shard of one permutation of the data set, exactly as
    ``torch.utils.data.DistributedSampler`` does (it is used underneath): shuffled by ``seed + epoch``; when
    ``drop_last`` the tail that does not divide among ranks is dropped, otherwise the shards are padded by
    repeating the first indices. ``len()`` is the number of batches the next iteration yields.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int, rank: int, world_size: int,
                 drop_last: bool) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        # DistributedSampler only needs len() of its "dataset", which a range has.
        self._shard = DistributedSampler(range(size), num_replicas=world_size, rank=rank,  # type: ignore[arg-type]
                                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate ``epoch`` next, beginning at its batch ``start_batch`` (to resume an interrupted run)."""
        if epoch < 0 or start_batch < 0:
            raise DataError(f"epoch and start_batch must be non-negative, got {epoch} and {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        full, rest = divmod(len(self._shard), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self) -> Iterator[List[SampleKey]]:
        self._shard.set_epoch(self.epoch)
        indices = list(self._shard)
        for first in range(self.start_batch * self.batch_size, len(indices), self.batch_size):
            batch = indices[first:first + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield [SampleKey(i, self.seed, self.epoch) for i in batch]


def seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Every loader worker's ``worker_init_fn``: ignore the job's stop signals (see :mod:`data.worker_signals`),
    and seed ``random``, numpy and torch from (seed, rank, worker id), for anything random outside the keyed
    augmentation (which does not depend on these)."""
    ignore_stop_signals()
    worker_seed = derive_seed(seed, rank, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)


def build_loader(dataset: ImageDataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, workers: int, drop_last: bool, pin_memory: bool,
                 persistent_workers: bool, start_batch: int = 0) -> DataLoader:
    """A DataLoader over this rank's shard, positioned at ``epoch`` (from batch ``start_batch``).

    ``pin_memory`` applies only when CUDA is available; ``persistent_workers`` only with workers.
    """
    if workers < 0:
        raise DataError(f"data.workers must be non-negative, got {workers}")
    sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                  world_size=world_size, drop_last=drop_last)
    if sampler.batches_per_epoch() == 0:
        raise DataError(f"{dataset} gives no full batch of {batch_size} per rank over {world_size} rank(s); "
                        "use a smaller batch or more samples")
    sampler.set_epoch(epoch, start_batch)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and workers > 0,
        worker_init_fn=functools.partial(seed_worker, seed, rank),
        # Its own generator: creating an iterator draws a base seed, which must not advance the global RNG
        # (a resumed run re-creates the loader mid-epoch, and dropout must still match the uninterrupted run).
        generator=torch.Generator().manual_seed(derive_seed(seed, rank, epoch)),
    )
