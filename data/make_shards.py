"""Convert an image folder or tar into WebDataset-style shards: ``python -m data.make_shards --help``.

Samples are shuffled once (``--seed``) before they are cut into shards, so every shard is a mix of classes and
a rank that streams only its own shards still sees every class. Shard sizes differ by at most one. The files
are copied byte for byte (no re-encoding); each shard is written to a temporary name and renamed when complete,
and ``index.json`` is written last, so an interrupted conversion leaves no folder that looks finished.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, cast, get_args

import numpy as np

from data.build import Split, build_dataset
from data.config import DataConfig
from data.encoded import EncodedImageDataset
from data.errors import DataError
from data.loader import Order
from data.shards import INDEX_FILE, INDEX_FORMAT, shard_file, shard_sizes
from data.transforms import build_transform


def _member(name: str, data: bytes) -> tuple:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, io.BytesIO(data)


def write_shard(path: Path, dataset: EncodedImageDataset, positions: Order,
                first_key: int) -> List[int]:
    """Samples ``positions`` of ``dataset`` as ``<key>.<ext>`` + ``<key>.cls`` members; returns their labels."""
    labels: List[int] = []
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    os.close(handle)
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as archive:
            for k, position in enumerate(positions):
                j = int(dataset._index[position])
                key = f"{first_key + k:08d}"
                suffix = os.path.splitext(dataset._name(j))[1].lower() or ".jpg"
                try:
                    data = dataset._read(j)
                except OSError as err:
                    raise DataError(f"cannot read {dataset._name(j)}: {err}") from err
                label = int(dataset._labels[j])
                archive.addfile(*_member(key + suffix, data))
                archive.addfile(*_member(key + ".cls", str(label).encode()))
                labels.append(label)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return labels


def parse_splits(text: str) -> List[Split]:
    """``train,val`` -> the splits, or a DataError naming the one that is not a split."""
    names = [s for s in text.split(",") if s]
    for name in names:
        if name not in get_args(Split):
            raise DataError(f"--splits: {name!r} is not a split; use train and/or val")
    return cast(List[Split], names)


def make_shards(data: str, out: Path, shard_size: int, splits: Sequence[Split], seed: int) -> Dict:
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    cfg = DataConfig(dataset="tar" if os.path.isfile(data) else "imagefolder", path=data)
    transform = build_transform("eval", 32, cfg)
    out.mkdir(parents=True, exist_ok=True)
    index: Dict = {"format": INDEX_FORMAT, "source": os.path.abspath(data), "seed": seed, "splits": {}}
    for split in splits:
        dataset = build_dataset(cfg, split, transform)
        if not isinstance(dataset, EncodedImageDataset):
            raise DataError(f"--data {data}: expected an image folder or tar")
        index.setdefault("classes", dataset.classes)
        order = np.random.default_rng(seed).permutation(len(dataset))
        shards, start = [], 0
        for number, size in enumerate(shard_sizes(len(dataset), shard_size)):
            name = shard_file(split, number)
            labels = write_shard(out / name, dataset, order[start:start + size], start)
            shards.append({"file": name, "labels": labels})
            start += size
        index["splits"][split] = shards
        print(json.dumps({"split": split, "images": len(dataset), "shards": len(shards), "out": str(out)}),
              flush=True)
    tmp = out / (INDEX_FILE + ".part")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX_FILE)
    return index


def main(argv: Sequence[str] = tuple(sys.argv[1:])) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="image folder or tar (train/<class>/*, val/<class>/*)")
    parser.add_argument("--out", required=True, type=Path, help="shard folder to write")
    parser.add_argument("--shard-size", required=True, type=int, help="images per shard (at most)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits to convert")
    parser.add_argument("--seed", type=int, default=0, help="seed of the one-off shuffle before sharding")
    args = parser.parse_args(argv)
    try:
        make_shards(args.data, args.out, args.shard_size, parse_splits(args.splits), args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
