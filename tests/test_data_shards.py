"""Sharded streaming on real CIFAR-10 JPEGs: ``python -m data.make_shards``, every image once per epoch across
ranks that each read only their own shards, exact mid-epoch resume, named corrupt members, and a training run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from test_data import assert_same_batches

from conftest import TINY_MODEL
from data import DataConfig, DataError, EpochLoader, build_dataset, build_transform
from data.shards import ShardDataset, ShardStreamSampler, buffer_shuffle, scan_shard, shard_sizes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_folder(shared_cifar_tarball, tmp_path_factory) -> Path:
    """40 training and 12 validation CIFAR-10 JPEGs, copied byte for byte into an image folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFNET_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        cfg = DataConfig(dataset="tar", path=str(shared_cifar_tarball))
        root = tmp_path_factory.mktemp("cifar")
        for split, count in (("train", 40), ("val", 12)):
            source = build_dataset(cfg, split, build_transform("eval", 32, cfg)).subset(count)
            for position in range(len(source)):
                j = int(source._index[position])
                target = root / split / source.classes[int(source._labels[j])] / f"{j:05d}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source._read(j))
    return root


def make_shards(data: Path, out: Path, shard_size: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.make_shards", "--data", str(data), "--out", str(out),
                           "--shard-size", str(shard_size)], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def shards(cifar_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    done = make_shards(cifar_folder, out, 10)
    assert done.returncode == 0, done.stderr
    return out


def shard_set(path: Path, split: str = "train", transform: str = "eval") -> ShardDataset:
    cfg = DataConfig(dataset="shards", path=str(path), shuffle_buffer=16)
    dataset = build_dataset(cfg, split, build_transform(transform, 32, cfg))  # type: ignore[arg-type]
    assert isinstance(dataset, ShardDataset)
    return dataset


def fingerprints(batches) -> List[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for images, _ in batches for image in images]


@pytest.mark.slow
def test_make_shards_writes_webdataset_style_tars_and_an_index(shards, cifar_folder):
    index = json.loads((shards / "index.json").read_text())
    assert [len(s["labels"]) for s in index["splits"]["train"]] == [10, 10, 10, 10]
    assert [len(s["labels"]) for s in index["splits"]["val"]] == [6, 6]
    with tarfile.open(shards / "train-000000.tar") as archive:
        names = archive.getnames()
        assert names[:4] == ["00000000.jpg", "00000000.cls", "00000001.jpg", "00000001.cls"]
        assert int(archive.extractfile("00000000.cls").read()) == index["splits"]["train"][0]["labels"][0]
    sizes = shard_sizes(1003, 100)
    assert len(sizes) == 11 and sum(sizes) == 1003 and max(sizes) - min(sizes) <= 1 and max(sizes) <= 100
    # The shards hold the folder's files byte for byte, with their labels.
    folder = {p.read_bytes(): p.parent.name for p in cifar_folder.glob("train/*/*.jpg")}
    dataset = shard_set(shards)
    assert sorted(dataset.classes) == dataset.classes and len(dataset) == 40
    assert {dataset._read(j): dataset.classes[dataset.targets[j]] for j in range(len(dataset))} == folder


@pytest.mark.slow
def test_one_epoch_over_two_ranks_sees_every_image_exactly_once(shards, cifar_folder):
    cfg = DataConfig(dataset="imagefolder", path=str(cifar_folder))
    folder = build_dataset(cfg, "train", build_transform("eval", 32, cfg))
    expected = Counter(fingerprints([(torch.stack([folder[j][0] for j in range(len(folder))]), None)]))
    assert len(expected) == 40
    seen: Counter = Counter()
    per_rank: List[Dict[int, List[str]]] = []
    for rank, workers in ((0, 2), (1, 0)):
        dataset = shard_set(shards)
        loader = EpochLoader(dataset, 5, shuffle=True, seed=7, rank=rank, world_size=2, workers=workers,
                             drop_last=True, pin_memory=False, persistent_workers=True)
        epochs = {epoch: fingerprints(loader.epoch(epoch)) for epoch in (0, 1)}
        loader.close()
        seen.update(epochs[0])
        per_rank.append(epochs)
        if workers == 0:  # read in this process: only this rank's shards were ever opened
            assert set(dataset._members) == {rank, rank + 2}
    assert seen == expected
    for epochs in per_rank:  # a rank keeps its shards: same images, new order, every epoch
        assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


@pytest.mark.slow
def test_resume_mid_epoch_continues_at_the_right_sample(shards):
    dataset = shard_set(shards, transform="train")
    loader = EpochLoader(dataset, 4, shuffle=True, seed=1, rank=1, world_size=2, workers=2, drop_last=True,
                         pin_memory=False, persistent_workers=True)
    whole = list(loader.epoch(3))
    assert len(whole) == 5
    assert_same_batches(list(loader.epoch(3, start_batch=2)), whole[2:])
    loader.close()
    fresh = EpochLoader(shard_set(shards, transform="train"), 4, shuffle=True, seed=1, rank=1, world_size=2,
                        workers=0, drop_last=True, pin_memory=False, persistent_workers=False)
    assert_same_batches(list(fresh.epoch(3, start_batch=3)), whole[3:])


@pytest.mark.slow
def test_a_corrupt_member_is_named(shards, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in shards.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    members = scan_shard(str(broken / "train-000002.tar"), 10)
    with open(broken / "train-000002.tar", "r+b") as f:  # same size, so the tar itself stays readable
        f.seek(int(members.offsets[3]))
        f.write(b"\x00garbage" * (int(members.sizes[3]) // 8))
    dataset = shard_set(broken)
    with pytest.raises(DataError, match=f"corrupt image {broken / 'train-000002.tar'}:{members.names[3]}"):
        dataset[2 * 10 + 3]
    assert dataset[2 * 10 + 4][0].shape == (3, 32, 32)


@pytest.mark.slow
def test_damaged_folders_and_too_many_ranks_give_clear_errors(shards, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'index.json'} does not exist.*data.make_shards"):
        shard_set(tmp_path)
    cut = tmp_path / "cut"
    cut.mkdir()
    for path in shards.iterdir():
        (cut / path.name).write_bytes(path.read_bytes())
    data = (cut / "train-000001.tar").read_bytes()
    (cut / "train-000001.tar").write_bytes(data[:len(data) // 3])
    with pytest.raises(DataError, match=f"shard {cut / 'train-000001.tar'}"):
        shard_set(cut)[10]
    with pytest.raises(DataError, match="has 4 shard\\(s\\) for 8 ranks"):
        ShardStreamSampler(shard_set(shards), 2, seed=0, rank=0, world_size=8, drop_last=True)
    with pytest.raises(DataError, match="has no 'test' split \\(it has: train, val\\)"):
        ShardDataset(str(shards), "test", build_transform("eval", 32, DataConfig()))


def test_shuffle_buffer_is_a_seeded_local_permutation():
    stream = np.arange(1000)
    out = buffer_shuffle(stream, 50, np.random.default_rng(0))
    assert sorted(out.tolist()) == stream.tolist() and not np.array_equal(out, stream)
    assert np.array_equal(out, buffer_shuffle(stream, 50, np.random.default_rng(0)))
    position = np.empty(1000, dtype=np.int64)
    position[out] = np.arange(1000)
    assert (stream - position).max() <= 50  # nothing comes out more than a buffer's length early
    assert np.array_equal(buffer_shuffle(stream, 1, np.random.default_rng(0)), stream)


@pytest.mark.slow
def test_training_runs_from_shards(shards, tmp_path):
    from train.checkpoint import load_checkpoint
    from train.cli import main

    settings = TINY_MODEL + [
        "data.dataset=shards", f"data.path={shards}", "data.workers=1", "data.shuffle_buffer=16",
        "train.resolution=32", "train.micro_batch_size=8", "train.val_batch_size=12", "train.epochs=2",
        "optimizer.reference_batch=8", "logging.wandb=disabled", f"logging.run_dir={tmp_path}",
    ]
    assert main([a for s in settings for a in ("--set", s)]) == 0
    (run,) = tmp_path.iterdir()
    assert load_checkpoint(run / "checkpoints" / "train-final.pt")["position"]["step"] == 2 * 40 // 8
