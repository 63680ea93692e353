"""Batches for one rank: a seeded, sharded, resumable order, reproducibly seeded workers, and a loader that keeps
its workers for a whole phase.

Epochs: the loader's ``batch_sampler`` is an :class:`EpochBatchSampler`; call
``loader.batch_sampler.set_epoch(epoch)`` before iterating each epoch (as with ``DistributedSampler``).
:class:`EpochLoader` does that for you and keeps one ``DataLoader`` (and, with persistent workers, its worker
processes) across epochs: the epoch travels inside every :class:`~data.base.SampleKey` the sampler yields, so
workers holding an old copy of the data set still augment each epoch correctly.

Resuming: ``set_epoch(epoch, start_batch=k)`` (or ``build_loader(..., start_batch=k)``) yields exactly the
batches that an uninterrupted epoch would have yielded from batch ``k`` on, augmentation included, because
the order depends only on (seed, epoch, rank) and each sample's augmentation only on (seed, epoch, index).

PopTorch: wrap the loader in ``poptorch.AsynchronousDataAccessor`` if wanted; it iterates a pickled copy, so
build a new loader for each epoch rather than calling ``set_epoch`` on the original.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from data.base import ImageDataset, SampleKey
from data.errors import DataError
from data.host import default_workers
from data.seeding import derive_seed
from data.worker_signals import ignore_stop_signals

#: An epoch's sample order: positions into the data set.
Order = Union[Sequence[int], np.ndarray]

class EpochBatchSampler(Sampler[List[SampleKey]]):
    """This rank's batches of :class:`SampleKey` for one epoch at a time, resumable at any batch.

    Subclasses say which positions of the data set this rank visits in an epoch, and in what order
    (:meth:`_order`, a pure function of the seed, the epoch and the rank); this class cuts them into batches.
    ``len()`` is the number of batches the next iteration yields.
    """

    def __init__(self, batch_size: int, *, seed: int, drop_last: bool) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def _order(self, epoch: int) -> Order:
        raise NotImplementedError

    def samples_per_epoch(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate ``epoch`` next, beginning at its batch ``start_batch`` (to resume an interrupted run)."""
        if epoch < 0 or start_batch < 0:
            raise DataError(f"epoch and start_batch must be non-negative, got {epoch} and {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.samples_per_epoch(), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self) -> Iterator[List[SampleKey]]:
        indices = self._order(self.epoch)
        for first in range(self.start_batch * self.batch_size, len(indices), self.batch_size):
            batch = indices[first:first + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield [SampleKey(int(i), self.seed, self.epoch) for i in batch]


class ShardedBatchSampler(EpochBatchSampler):
    """Each rank takes a disjoint, equal-size shard of one permutation of the data set, exactly as
    ``torch.utils.data.DistributedSampler`` does (it is used underneath): shuffled by ``seed + epoch``; when
    ``drop_last`` the tail that does not divide among ranks is dropped, otherwise the shards are padded by
    repeating the first indices."""

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int, rank: int, world_size: int,
                 drop_last: bool) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
        super().__init__(batch_size, seed=seed, drop_last=drop_last)
        # DistributedSampler only needs len() of its "dataset", which a range has.
        self._shard: DistributedSampler[int] = DistributedSampler(
            range(size), num_replicas=world_size, rank=rank,  # type: ignore[arg-type]
            shuffle=shuffle, seed=max(seed, 0), drop_last=drop_last)

    def samples_per_epoch(self) -> int:
        return len(self._shard)

    def _order(self, epoch: int) -> Order:
        self._shard.set_epoch(epoch)
        return list(self._shard)


def batch_sampler_for(dataset: ImageDataset, batch_size: int, *, shuffle: bool, seed: int, rank: int,
                      world_size: int, drop_last: bool) -> EpochBatchSampler:
    """Sharded data sets shuffle by shard (each rank reads only its own shards, see
    :meth:`data.base.ImageDataset.stream_sampler`); the rest by permutation."""
    streamed = dataset.stream_sampler(batch_size, seed=seed, rank=rank, world_size=world_size,
                                      drop_last=drop_last) if shuffle else None
    if streamed is not None:
        return streamed
    return ShardedBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, rank=rank,
                               world_size=world_size, drop_last=drop_last)


def seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Every loader worker's ``worker_init_fn``: ignore the job's stop signals (see :mod:`data.worker_signals`),
    and seed ``random``, numpy and torch from (seed, rank, worker id), for anything random outside the keyed
    augmentation (which does not depend on these)."""
    ignore_stop_signals()
    worker_seed = derive_seed(seed, rank, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)


def _data_loader(dataset: ImageDataset, sampler: EpochBatchSampler, *, seed: int, rank: int, epoch: int,
                 workers: Optional[int], pin_memory: bool, persistent_workers: bool,
                 prefetch_factor: int) -> DataLoader:
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise DataError(f"data.workers must be non-negative, got {workers}")
    if prefetch_factor < 1:
        raise DataError(f"data.prefetch_factor must be at least 1, got {prefetch_factor}")
    if sampler.batches_per_epoch() == 0:
        raise DataError(f"{dataset} gives no full batch of {sampler.batch_size} per rank; "
                        "use a smaller batch or more samples")
    extra: Dict[str, Any] = {"prefetch_factor": prefetch_factor} if workers > 0 else {}
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
        **extra,
    )


def build_loader(dataset: ImageDataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, workers: Optional[int], drop_last: bool, pin_memory: bool,
                 persistent_workers: bool, start_batch: int = 0, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over this rank's share, positioned at ``epoch`` (from batch ``start_batch``).

    ``workers`` None picks :func:`default_workers`; ``pin_memory`` applies only when CUDA is available;
    ``persistent_workers`` and ``prefetch_factor`` only with workers.
    """
    sampler = batch_sampler_for(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                                drop_last=drop_last)
    sampler.set_epoch(epoch, start_batch)
    return _data_loader(dataset, sampler, seed=seed, rank=rank, epoch=epoch, workers=workers, pin_memory=pin_memory,
                        persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)


class EpochLoader:
    """One DataLoader for a whole phase: built once, repositioned per epoch with :meth:`epoch`.

    With ``persistent_workers`` its worker processes start once instead of once per epoch (and keep whatever
    they opened: file descriptors, tar indexes). Every epoch yields exactly the batches a fresh
    :func:`build_loader` for that epoch would, because the order and the augmentation depend only on the
    keys. :meth:`serves` tells whether a data set view can reuse it (same samples, same transform).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1, workers: Optional[int], drop_last: bool, pin_memory: bool,
                 persistent_workers: bool, prefetch_factor: int = 2) -> None:
        self.dataset = dataset
        self.seed = seed
        self.sampler = batch_sampler_for(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                         world_size=world_size, drop_last=drop_last)
        self.loader: Optional[DataLoader] = _data_loader(
            dataset, self.sampler, seed=seed, rank=rank, epoch=0, workers=workers, pin_memory=pin_memory,
            persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)

    def serves(self, dataset: ImageDataset, batch_size: int, seed: int) -> bool:
        return (self.loader is not None and self.sampler.batch_size == batch_size and self.seed == seed
                and dataset.same_view(self.dataset))

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """The loader, positioned at ``epoch`` from batch ``start_batch``. An iteration left unfinished (a run that
        stopped mid-epoch) is discarded: the next one starts where this says."""
        if self.loader is None:
            raise DataError("this loader was closed")
        self.sampler.set_epoch(epoch, start_batch)
        return self.loader

    def close(self) -> None:
        """Stop the workers (dropping the loader drops its iterator, which shuts them down)."""
        self.loader = None
