"""WebDataset-style tar shards, streamed per rank (see docs/data.md, "Shards").

A shard folder, as ``python -m data.make_shards`` writes it::

    index.json              classes, and for each split its shard files and every sample's label
    train-000000.tar        members 00000000.jpg 00000000.cls 00000001.jpg 00000001.cls ...
    ...
    val-000000.tar

Each member pair is one sample (WebDataset's convention: a key, then one member per field), so the shards
also work with WebDataset's own readers. Training reads them as a stream: rank ``r`` of ``W`` owns shards
``r, r + W, r + 2W, ...`` of the split (always the same ones, so a host needs only its own ranks' shards),
visits them in a seeded order each epoch and passes their samples through a seeded shuffle buffer. The order
is computed from the sample counts alone, so an epoch can resume at any batch without reading what came before.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Dict, List, NamedTuple

import numpy as np

from data.encoded import EncodedImageDataset
from data.errors import DataError
from data.layout import INDEX_FILE, is_image
from data.loader import EpochBatchSampler, Order
from data.seeding import derive_seed
from data.tar import PositionalReader
from data.transforms import Preprocessing

INDEX_FORMAT = "effnet-ipu-shards-1"


class ShardMembers(NamedTuple):
    """Where each image of one shard is: member names, data offsets and sizes, in sample order."""

    names: List[str]
    offsets: np.ndarray
    sizes: np.ndarray


def scan_shard(path: str, expected: int) -> ShardMembers:
    """One pass over a shard's tar headers (seeks past the data); checks it holds ``expected`` images."""
    names: List[str] = []
    offsets: List[int] = []
    sizes: List[int] = []
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if member.isfile() and is_image(os.path.basename(member.name)):
                    names.append(member.name)
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"shard {path} is not a readable tar archive: {err}") from err
    if len(names) != expected:
        raise DataError(f"shard {path} holds {len(names)} images but {INDEX_FILE} lists {expected}; "
                        "was it rewritten or truncated? Re-run python -m data.make_shards")
    return ShardMembers(names, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64))


def read_index(root: str) -> Dict:
    path = os.path.join(root, INDEX_FILE)
    if not os.path.isfile(path):
        raise DataError(f"shards data set: {path} does not exist; make the shard folder with "
                        "python -m data.make_shards --data PATH --out DIR --shard-size N")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"shards data set: {path} is not readable JSON: {err}") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DataError(f"shards data set: {path} is not a {INDEX_FORMAT} index (format: "
                        f"{index.get('format') if isinstance(index, dict) else None!r})")
    return index


class ShardDataset(EncodedImageDataset):
    """The samples of one split's shards, addressable by index (shard by shard, in file order).

    Nothing is read at construction but ``index.json``; a shard's tar headers are scanned the first time a
    process reads from it, so a rank touches only the shards it reads.
    """


    def stream_sampler(self, batch_size: int, *, seed: int, rank: int, world_size: int,
                       drop_last: bool) -> EpochBatchSampler:
        return ShardStreamSampler(self, batch_size, seed=seed, rank=rank, world_size=world_size,
                                  drop_last=drop_last)
    def __init__(self, root: str, split: str, transform: Preprocessing, skip_corrupt: bool = False,
                 shuffle_buffer: int = 10000) -> None:
        if not os.path.isdir(root):
            raise DataError(f"shards data set: {root} is not a folder (make one with python -m data.make_shards)")
        index = read_index(root)
        shards = index.get("splits", {}).get(split)
        if not shards:
            raise DataError(f"shards data set: {os.path.join(root, INDEX_FILE)} has no {split!r} split "
                            f"(it has: {', '.join(index.get('splits', {})) or 'none'})")
        if shuffle_buffer < 1:
            raise DataError(f"data.shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.root = root
        self.shuffle_buffer = shuffle_buffer
        self._paths = [os.path.join(root, shard["file"]) for shard in shards]
        counts = np.array([len(shard["labels"]) for shard in shards], dtype=np.int64)
        self._counts = counts
        self._shard_of = np.repeat(np.arange(len(shards), dtype=np.int64), counts)
        self._local = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        self._members: Dict[int, ShardMembers] = {}
        self._readers: Dict[int, PositionalReader] = {}
        labels = np.concatenate([np.asarray(shard["labels"], dtype=np.int64) for shard in shards])
        classes = list(index["classes"])
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"shards data set: {os.path.join(root, INDEX_FILE)} has labels outside "
                            f"0..{len(classes) - 1}")
        super().__init__(classes, labels, transform, skip_corrupt, source=f"{root} ({split}, {len(shards)} shards)")

    def shard_of_positions(self) -> np.ndarray:
        """The shard of each position of this view, in index order (subsets keep file order)."""
        return self._shard_of[self._index]

    def _shard(self, s: int) -> ShardMembers:
        if s not in self._members:
            self._members[s] = scan_shard(self._paths[s], int(self._counts[s]))
        return self._members[s]

    def _read(self, j: int) -> bytes:
        s, k = int(self._shard_of[j]), int(self._local[j])
        members = self._shard(s)
        reader = self._readers.get(s)
        if reader is None:
            reader = self._readers[s] = PositionalReader(self._paths[s])
        return reader.read(int(members.offsets[k]), int(members.sizes[k]))

    def _name(self, j: int) -> str:
        s, k = int(self._shard_of[j]), int(self._local[j])
        members = self._members.get(s)
        return f"{self._paths[s]}:{members.names[k]}" if members else f"{self._paths[s]} (sample {k})"


def buffer_shuffle(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """What a streaming shuffle buffer of ``size`` samples outputs for ``stream``: fill it, then for each new
    sample emit a uniformly chosen buffered one and put the new one in its place; at the end emit the rest in
    random order. Samples move at most about ``size`` places earlier, so reads stay within a few shards."""
    size = min(size, len(stream))
    buffer = stream[:size].copy()
    out = np.empty_like(stream)
    slots = rng.integers(0, size, len(stream) - size) if size else np.empty(0, dtype=np.int64)
    for k, (slot, sample) in enumerate(zip(slots.tolist(), stream[size:].tolist())):
        out[k] = buffer[slot]
        buffer[slot] = sample
    out[len(stream) - size:] = rng.permutation(buffer)
    return out


class ShardStreamSampler(EpochBatchSampler):
    """Rank ``rank`` streams its own shards (``rank::world_size`` of the split's): a seeded shard order per epoch,
    then a seeded shuffle buffer. Every rank yields the same number of samples, the smallest rank's share, so
    DDP ranks step together; with equal shards and a shard count divisible by the ranks nothing is left out."""

    def __init__(self, dataset: ShardDataset, batch_size: int, *, seed: int, rank: int, world_size: int,
                 drop_last: bool) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
        super().__init__(batch_size, seed=seed, drop_last=drop_last)
        shard_of = dataset.shard_of_positions()
        present = np.unique(shard_of)
        if len(present) < world_size:
            raise DataError(f"{dataset} has {len(present)} shard(s) for {world_size} ranks; each rank needs at "
                            "least one: make smaller shards (python -m data.make_shards --shard-size)")
        owned = present[rank::world_size]
        self._positions: Dict[int, np.ndarray] = {int(s): np.flatnonzero(shard_of == s) for s in owned}
        shares = [int(np.isin(shard_of, present[r::world_size]).sum()) for r in range(world_size)]
        self._samples = min(shares)
        self._rank = rank
        self._buffer = dataset.shuffle_buffer

    def samples_per_epoch(self) -> int:
        return self._samples

    def _order(self, epoch: int) -> Order:
        rng = np.random.default_rng(derive_seed(self.seed, epoch, self._rank))
        shards = list(self._positions)
        order = [shards[i] for i in rng.permutation(len(shards))]
        stream = np.concatenate([self._positions[s] for s in order])
        return buffer_shuffle(stream, self._buffer, rng)[:self._samples]


def shard_sizes(total: int, shard_size: int) -> List[int]:
    """``ceil(total / shard_size)`` shards whose sizes differ by at most one (none larger than ``shard_size``)."""
    count = -(-total // shard_size)
    return [len(part) for part in np.array_split(np.arange(total), count)] if total else []


def shard_file(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"
