"""Loaders that live for a phase: persistent workers give exactly the batches of fresh loaders, resume mid-epoch
stays exact, worker processes really are kept, and the worker count and prefetch settings reach the loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple, Union

import pytest
import torch
from test_data import TREE_CLASSES, assert_same_batches, write_tree

from conftest import TINY_MODEL, needs_fashion
from data import DataConfig, EpochLoader, SampleKey, build_dataset, build_loader, build_transform
from data.host import default_workers, usable_cores
from data.imagefolder import ImageFolderDataset

Batches = List[Tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture
def augmented(tmp_path):
    root = write_tree(tmp_path / "aug", {name: 8 for name in TREE_CLASSES})
    cfg = DataConfig(dataset="imagefolder", path=str(root))
    return build_dataset(cfg, "train", build_transform("train", 16, cfg))


def fresh(dataset, epoch: int, start_batch: int = 0) -> Batches:
    return list(build_loader(dataset, 5, shuffle=True, seed=3, epoch=epoch, workers=0, drop_last=True,
                             pin_memory=False, persistent_workers=False, start_batch=start_batch))


def kept(dataset, workers: int = 2) -> EpochLoader:
    return EpochLoader(dataset, 5, shuffle=True, seed=3, workers=workers, drop_last=True, pin_memory=False,
                       persistent_workers=True, prefetch_factor=3)


def test_two_epochs_with_persistent_workers_equal_two_fresh_loaders(augmented):
    loader = kept(augmented)
    try:
        for epoch in (0, 1):
            assert_same_batches(list(loader.epoch(epoch)), fresh(augmented, epoch))
        # An epoch abandoned after one batch (a run that stopped) does not leak into the next one.
        next(iter(loader.epoch(2)))
        assert_same_batches(list(loader.epoch(3)), fresh(augmented, 3))
        # Resuming mid-epoch on the kept workers gives the rest of that epoch exactly.
        assert_same_batches(list(loader.epoch(1, start_batch=2)), fresh(augmented, 1)[2:])
    finally:
        loader.close()
    labels = [[y.tolist() for _, y in fresh(augmented, epoch)] for epoch in (0, 1)]
    assert labels[0] != labels[1]  # epochs differ, so the comparisons above can fail


class WorkerPids(ImageFolderDataset):
    """Labels each sample with the pid of the process that loaded it."""

    def __getitem__(self, key: Union[int, SampleKey]):
        image, _ = super().__getitem__(key)
        return image, os.getpid()


def test_persistent_workers_are_the_same_processes_every_epoch(augmented):
    dataset = WorkerPids(augmented.folder.rsplit("/", 1)[0], "train", augmented.transform)
    pids = []
    for persistent in (True, False):
        loader = EpochLoader(dataset, 5, shuffle=True, seed=3, workers=2, drop_last=True, pin_memory=False,
                             persistent_workers=persistent)
        pids.append([{int(p) for _, labels in loader.epoch(e) for p in labels} for e in range(3)])
        loader.close()
    kept_pids, fresh_pids = pids
    assert len(kept_pids[0]) == 2 and kept_pids[0] == kept_pids[1] == kept_pids[2]
    assert not fresh_pids[0] & fresh_pids[1]  # without persistence each epoch starts new workers
    assert os.getpid() not in kept_pids[0]


def test_a_view_with_an_equal_transform_reuses_the_loader(augmented):
    loader = kept(augmented, workers=0)
    same = augmented.with_transform(build_transform("train", 16, DataConfig()))
    assert loader.serves(same, 5, 3)
    assert not loader.serves(augmented.with_transform(build_transform("train", 24, DataConfig())), 5, 3)
    assert not loader.serves(augmented.subset(12), 5, 3)
    assert not loader.serves(same, 6, 3) and not loader.serves(same, 5, 4)
    loader.close()
    assert not loader.serves(same, 5, 3)


def test_worker_count_defaults_to_the_cores_per_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    cores = usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert default_workers() == max(cores - 1, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == max(cores // 2 - 1, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", str(cores))  # poprun (Open MPI): one core per instance
    assert default_workers() == 0
    assert DataConfig().workers == 0  # resolved when the section is built: config.yaml records what ran


def test_prefetch_factor_and_persistence_reach_the_dataloader(augmented):
    loader = kept(augmented).epoch(0)
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (2, 3, True)
    single = build_loader(augmented, 5, shuffle=True, seed=3, epoch=0, workers=0, drop_last=True,
                          pin_memory=True, persistent_workers=True, prefetch_factor=3)
    assert not single.persistent_workers and single.pin_memory == torch.cuda.is_available()


# ------------------------------------------------------------------------------------------- end to end
TINY = TINY_MODEL + [
    "data.dataset=fashion-mnist", "data.crop_scale=[0.5,1.0]", "data.train_subset=320", "data.val_subset=64",
    "train.resolution=32", "train.micro_batch_size=32", "train.val_batch_size=64", "train.epochs=2",
    "optimizer.lr=0.05", "optimizer.reference_batch=256", "schedule.name=cosine", "logging.wandb=disabled",
    "logging.log_every=5", "model.dropout=0.2",
]


def train(run_dir: Path, *extra: str, resume: str = None) -> dict:
    from train.checkpoint import load_checkpoint
    from train.cli import main

    args = [a for s in TINY + [f"logging.run_dir={run_dir}", *extra] for a in ("--set", s)]
    assert main(args + (["--resume", resume] if resume else [])) == 0
    (folder,) = run_dir.iterdir()
    return load_checkpoint(folder / "checkpoints" / "train-final.pt")


@needs_fashion
@pytest.mark.slow
def test_training_with_persistent_workers_matches_fresh_in_process_loading_and_resumes_exactly(tmp_path):
    """Two epochs with two persistent workers end with the same weights as loading in the main process, and a
    resume from mid-epoch 2 (new workers, started at that batch) ends with them too."""
    kept_run = train(tmp_path / "kept", "data.workers=2", "data.persistent_workers=true",
                     "checkpoint.every_steps=7", "checkpoint.keep=100")
    plain_run = train(tmp_path / "plain", "data.workers=0")
    for key, value in plain_run["model"].items():
        assert torch.equal(value, kept_run["model"][key]), key
    (folder,) = (tmp_path / "kept").iterdir()
    middle = folder / "checkpoints" / "train-step00000014.pt"  # 10 steps per epoch: mid-epoch 2
    copy = tmp_path / "resumed" / "run" / "checkpoints"
    copy.mkdir(parents=True)
    (copy / middle.name).write_bytes(middle.read_bytes())
    from train.checkpoint import load_checkpoint
    from train.cli import main

    assert main(["--resume", str(copy / middle.name)]) == 0
    resumed = load_checkpoint(copy / "train-final.pt")
    for key, value in plain_run["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
