"""Data sets, preprocessing and loaders, on real files: Fashion-MNIST's idx files, JPEG/PNG trees written
here with PIL, tarballs made with ``tarfile``, and the shared CIFAR-10 JPEG tarball."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataConfig, DataError, SampleKey, ShardedBatchSampler, build_dataset, build_loader, build_transform
from data.fashion_mnist import CLASSES as FASHION_CLASSES
from data.imagefolder import ImageFolderDataset
from data.tar import TarDataset

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TREE_CLASSES = ["bird", "cat", "dog"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True, scope="module")
def cache_in_tmp(tmp_path_factory):
    """Tarball caches go to a temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFNET_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def write_image(path: Path, seed: int, grayscale: bool = False) -> None:
    """A small, non-square image with structure (a gradient plus noise), so crops differ visibly."""
    rng = np.random.default_rng(seed)
    height, width = 30 + seed % 7, 40 + seed % 5
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    pixels = (ramp + rng.integers(0, 55, (height, width, 3))).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if grayscale:
        Image.fromarray(pixels[:, :, 0]).save(path)
    else:
        Image.fromarray(pixels).save(path)


def write_tree(root: Path, per_class: Dict[str, int], val_dir: str = "val") -> Path:
    """train/<class>/ with ``per_class`` images each (JPEG, and PNG for every third), val/ with two per class
    except ``bird``, which has no validation images (the class indices must still match), plus a grayscale
    PNG in val/cat/."""
    seed = 0
    for name, count in per_class.items():
        for i in range(count):
            seed += 1
            suffix = "png" if i % 3 == 2 else "jpg"
            write_image(root / "train" / name / f"{i:03d}.{suffix}", seed)
    for name in per_class:
        if name == "bird":
            continue
        for i in range(2):
            seed += 1
            write_image(root / val_dir / name / f"v{i}.jpg", seed)
    if "cat" in per_class:
        write_image(root / val_dir / "cat" / "gray.png", 99, grayscale=True)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "images", {name: 4 for name in TREE_CLASSES})


def cfg_for(path, **kwargs) -> DataConfig:
    return DataConfig(dataset="imagefolder", path=str(path), **kwargs)


def eval_transform(size: int = 16):
    return build_transform("eval", size, DataConfig())


def train_transform(size: int = 16):
    return build_transform("train", size, DataConfig())


def make_tar(tree_root: Path, target: Path, mode: str, arcroot: str = "") -> Path:
    with tarfile.open(target, mode) as archive:
        for split in sorted(os.listdir(tree_root)):
            archive.add(tree_root / split, arcname=f"{arcroot}{split}")
    return target


# ------------------------------------------------------------------------------------------ fashion-mnist
@pytest.fixture(scope="module")
def fashion_root() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST


def test_fashion_mnist_real_files(fashion_root):
    cfg = DataConfig(dataset="fashion-mnist")
    train = build_dataset(cfg, "train", train_transform(32))
    val = build_dataset(cfg, "val", eval_transform(32))
    assert (len(train), len(val)) == (60000, 10000)
    assert train.classes == val.classes == FASHION_CLASSES and train.num_classes == 10
    assert np.bincount(train.targets).tolist() == [6000] * 10
    for dataset in (train, val):
        for index in (0, 1234, len(dataset) - 1):
            image, label = dataset[index]
            assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
            assert 0 <= label <= 9 and label == dataset.targets[index]
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
            assert image.max() > 0  # not a blank canvas


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is corrupt or truncated"),
    ("labels-as-images", "is not a 3-d uint8 idx file"),
    ("short-payload", "is truncated or padded"),
])
def test_fashion_mnist_damaged_file_is_named(fashion_root, tmp_path, damage, message):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(fashion_root / name, tmp_path / name)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:100000])
    elif damage == "labels-as-images":
        shutil.copy(tmp_path / "t10k-labels-idx1-ubyte.gz", images)
    else:
        with gzip.open(fashion_root / "t10k-images-idx3-ubyte.gz") as f:
            raw = f.read()
        images.write_bytes(gzip.compress(raw[:-28 * 28], compresslevel=1))
    with pytest.raises(DataError, match=message) as err:
        build_dataset(DataConfig(dataset="fashion-mnist", path=str(tmp_path)), "val", eval_transform())
    assert str(images) in str(err.value)


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig(dataset="fashion-mnist", path=str(missing)), "train", eval_transform())
    assert str(missing) in str(err.value) and "fashion-mnist" in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "make data" in str(err.value)


# -------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_reads_jpeg_png_and_grayscale(tree):
    train = build_dataset(cfg_for(tree), "train", eval_transform(16))
    val = build_dataset(cfg_for(tree), "val", eval_transform(16))
    assert train.classes == val.classes == TREE_CLASSES  # sorted, and from train/ although val lacks "bird"
    assert (len(train), len(val)) == (12, 5)
    assert train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert val.targets.tolist() == [1, 1, 1, 2, 2]  # cat/gray.png, cat/v0, cat/v1, dog/v0, dog/v1
    for dataset in (train, val):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
            assert label == dataset.targets[index]
    gray, _ = val[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    colour, _ = val[1]
    assert not torch.equal(colour[0], colour[2])


def test_imagefolder_accepts_test_instead_of_val(tmp_path):
    root = write_tree(tmp_path / "t", {"a": 1, "b": 1}, val_dir="test")
    assert len(build_dataset(cfg_for(root), "val", eval_transform())) == 4


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=f"imagefolder data set: {tmp_path / 'nope'} is not a folder"):
        build_dataset(cfg_for(tmp_path / "nope"), "train", eval_transform())


@pytest.mark.parametrize("kind", ["imagefolder", "tar"])
@pytest.mark.parametrize("layout, message", [
    ("no-val", "{top} has no val/ or test/ folder for the val split"),
    ("no-train", "{top} has no train/ folder for the train split"),
    ("empty-class", "empty class folder {top}{sep}train/empty"),
    ("unknown-class", "class folder {top}{sep}val/zebra has no counterpart in train/"),
])
def test_layout_errors_name_the_folder(tmp_path, kind, layout, message):
    root = write_tree(tmp_path / "images", {"a": 1})
    split = "train" if layout in ("no-train", "empty-class") else "val"
    if layout == "no-val":
        shutil.rmtree(root / "val")
    elif layout == "no-train":
        shutil.rmtree(root / "train")
    elif layout == "empty-class":
        (root / "train" / "empty").mkdir()
    elif layout == "unknown-class":
        write_image(root / "val" / "zebra" / "z.jpg", 5)
    if kind == "tar":
        top, sep = make_tar(root, tmp_path / "images.tar", "w"), ":"
    else:
        top, sep = root, "/"
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig(dataset=kind, path=str(top)), split, eval_transform())
    assert message.format(top=top, sep=sep) in str(err.value)


def test_path_is_required_for_folder_and_tar():
    for kind in ("imagefolder", "tar"):
        cfg = DataConfig(dataset=kind)
        with pytest.raises(ValueError, match=f"data.path is required for data.dataset '{kind}'"):
            cfg.validate()
        with pytest.raises(DataError, match="data.path is required"):
            build_dataset(cfg, "train", eval_transform())


def test_corrupt_image_is_named_or_skipped_and_counted(tree):
    bad = tree / "val" / "dog" / "v0.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG at all" * 10)
    val = build_dataset(cfg_for(tree), "val", eval_transform())
    with pytest.raises(DataError, match=f"corrupt image {bad}"):
        val[3]

    val = build_dataset(cfg_for(tree, skip_corrupt=True), "val", eval_transform())
    with pytest.warns(UserWarning, match=f"skipping corrupt image {bad}"):
        image, label = val[3]
    assert torch.equal(image, val[4][0]) and label == val[4][1]  # replaced by the next sample
    assert val.skipped == 1

    # Workers are separate processes; their skips add up in the counter the main process reads.
    fresh = build_dataset(cfg_for(tree, skip_corrupt=True), "val", eval_transform())
    loader = build_loader(fresh, 2, shuffle=False, seed=0, epoch=0, workers=2, drop_last=False,
                          pin_memory=False, persistent_workers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum(len(labels) for _, labels in loader) == len(fresh)
    assert fresh.skipped == 1

    # A pickled copy (spawned workers, PopTorch's asynchronous loader) still adds to the same count.
    with pytest.warns(UserWarning, match="skipping corrupt image"):
        pickle.loads(pickle.dumps(fresh))[3]
    assert fresh.skipped == 2


# ---------------------------------------------------------------------------------------------------- tar
def samples(dataset) -> List:
    return [(image, label) for image, label in (dataset[i] for i in range(len(dataset)))]


def assert_same_samples(a, b) -> None:
    assert a.classes == b.classes and len(a) == len(b)
    for (x, y), (u, v) in zip(samples(a), samples(b)):
        assert torch.equal(x, u) and y == v


@pytest.mark.parametrize("mode, suffix, arcroot", [
    ("w", ".tar", ""), ("w:gz", ".tar.gz", ""), ("w", ".tar", "imagenet-mini/"),
])
def test_tar_matches_the_folder_it_was_made_from(tree, tmp_path, mode, suffix, arcroot):
    archive = make_tar(tree, tmp_path / f"images{suffix}", mode, arcroot)
    for split in ("train", "val"):
        from_tar = build_dataset(DataConfig(dataset="tar", path=str(archive)), split, eval_transform())
        assert isinstance(from_tar, TarDataset)
        assert_same_samples(from_tar, ImageFolderDataset(str(tree), split, eval_transform()))
        assert_same_samples(from_tar, pickle.loads(pickle.dumps(from_tar)))  # reopens the file by itself


def test_tar_gz_is_decompressed_once_into_the_cache(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNET_CACHE_DIR", str(tmp_path / "cache"))
    archive = make_tar(tree, tmp_path / "images.tar.gz", "w:gz")
    build_dataset(DataConfig(dataset="tar", path=str(archive)), "train", eval_transform())
    cache = tmp_path / "cache" / "tar"
    cached = sorted(cache.glob("images.tar.gz-*.tar"))
    assert len(cached) == 1 and tarfile.is_tarfile(cached[0])
    stamp = cached[0].stat().st_mtime_ns
    build_dataset(DataConfig(dataset="tar", path=str(archive)), "val", eval_transform())
    assert sorted(cache.glob("images.tar.gz-*.tar")) == cached and cached[0].stat().st_mtime_ns == stamp
    assert not list(cache.glob("*.part"))


def test_tar_errors_name_the_archive_and_member(tree, tmp_path):
    missing = tmp_path / "missing.tar"
    with pytest.raises(DataError, match=f"tar data set: {missing} does not exist"):
        build_dataset(DataConfig(dataset="tar", path=str(missing)), "train", eval_transform())
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"hello" * 1000)
    with pytest.raises(DataError, match=f"{not_tar} is not a readable tar archive"):
        build_dataset(DataConfig(dataset="tar", path=str(not_tar)), "train", eval_transform())
    truncated_gz = tmp_path / "cut.tar.gz"
    truncated_gz.write_bytes(make_tar(tree, tmp_path / "whole.tar.gz", "w:gz").read_bytes()[:3000])
    with pytest.raises(DataError, match=f"cannot decompress {truncated_gz}"):
        build_dataset(DataConfig(dataset="tar", path=str(truncated_gz)), "train", eval_transform())

    (tree / "train" / "cat" / "001.jpg").write_bytes(b"garbage" * 50)
    archive = make_tar(tree, tmp_path / "images.tar", "w")
    train = build_dataset(DataConfig(dataset="tar", path=str(archive)), "train", eval_transform())
    with pytest.raises(DataError, match=f"corrupt image {archive}:train/cat/001.jpg"):
        train[5]


@pytest.fixture(scope="module")
def cifar(shared_cifar_tarball):
    cfg = DataConfig(dataset="tar", path=str(shared_cifar_tarball))
    return (build_dataset(cfg, "train", train_transform(24)), build_dataset(cfg, "val", eval_transform(24)))


@pytest.mark.slow
def test_shared_cifar10_tarball(cifar):
    train, val = cifar
    assert train.classes == val.classes == CIFAR_CLASSES
    assert (len(train), len(val)) == (50000, 10000)
    assert np.bincount(train.targets).tolist() == [5000] * 10
    assert np.bincount(val.targets).tolist() == [1000] * 10
    for dataset, index in ((train, 0), (train, 49999), (val, 4321)):
        image, label = dataset[SampleKey(index, seed=0, epoch=0)]
        assert image.shape == (3, 24, 24) and image.dtype == torch.uint8
        assert label == dataset.targets[index]


# ------------------------------------------------------------------------------------------------ loader
@pytest.fixture
def augmented(tmp_path):
    """24 training images with random crops and flips."""
    root = write_tree(tmp_path / "aug", {name: 8 for name in TREE_CLASSES})
    return build_dataset(cfg_for(root), "train", train_transform(16))


def epoch_batches(dataset, epoch, workers=0, start_batch=0, **kwargs):
    options = dict(batch_size=5, shuffle=True, seed=3, drop_last=True, pin_memory=False, persistent_workers=False)
    options.update(kwargs)
    loader = build_loader(dataset, epoch=epoch, workers=workers, start_batch=start_batch, **options)
    return list(loader)


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (x, y), (u, v) in zip(a, b):
        assert torch.equal(x, u) and torch.equal(y, v)


@pytest.mark.parametrize("size, drop_last", [(24, True), (25, True), (25, False)])
def test_ranks_get_disjoint_equal_shards(size, drop_last):
    shards = []
    for rank in range(2):
        sampler = ShardedBatchSampler(size, 4, shuffle=True, seed=1, rank=rank, world_size=2, drop_last=drop_last)
        shards.append([key.index for batch in sampler for key in batch])
    assert len(shards[0]) == len(shards[1]) > 0
    if drop_last:
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0])) == len(shards[0])
    else:  # the odd sample out is padded with a repeat, so every sample is seen
        assert set(shards[0]) | set(shards[1]) == set(range(size))


def test_same_seed_and_epoch_give_the_same_batches_with_or_without_workers(augmented):
    reference = epoch_batches(augmented, epoch=0)
    assert len(reference) == 4
    assert_same_batches(reference, epoch_batches(augmented, epoch=0))
    assert_same_batches(reference, epoch_batches(augmented, epoch=0, workers=2))
    other_epoch = epoch_batches(augmented, epoch=1)
    assert [y.tolist() for _, y in other_epoch] != [y.tolist() for _, y in reference]


def test_augmentation_depends_on_seed_epoch_index_only(augmented):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    key = SampleKey(7, seed=3, epoch=2)
    first = augmented[key][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    torch.manual_seed(999)
    assert torch.equal(augmented[key][0], first)
    crops = {tuple(augmented[SampleKey(7, seed=3, epoch=e)][0].flatten().tolist()) for e in range(6)}
    assert len(crops) > 1  # a new epoch draws new crops


def test_resuming_at_batch_k_gives_the_remaining_batches(augmented):
    full = epoch_batches(augmented, epoch=4)
    assert_same_batches(full[2:], epoch_batches(augmented, epoch=4, start_batch=2, workers=2))
    loader = build_loader(augmented, 5, shuffle=True, seed=3, epoch=0, workers=0, drop_last=True,
                          pin_memory=False, persistent_workers=False)
    loader.batch_sampler.set_epoch(4, start_batch=3)
    assert len(loader) == 1
    assert_same_batches(full[3:], list(loader))


def test_persistent_workers_follow_set_epoch(augmented):
    loader = build_loader(augmented, 5, shuffle=True, seed=3, epoch=0, workers=2, drop_last=True,
                          pin_memory=False, persistent_workers=True)
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        assert_same_batches(list(loader), epoch_batches(augmented, epoch=epoch))


def test_loader_refuses_a_batch_it_can_never_fill(augmented):
    with pytest.raises(DataError, match="no full batch of 32 per rank"):
        build_loader(augmented, 32, shuffle=True, seed=0, epoch=0, workers=0, drop_last=True,
                     pin_memory=False, persistent_workers=False)


# ------------------------------------------------------------------------------- transforms and subsets
def test_eval_transform_is_deterministic_and_crops_to_resolution():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    transform = eval_transform(20)
    out = transform(image)
    assert out.shape == (3, 20, 20) and out.dtype == torch.uint8
    assert torch.equal(out, transform(image))
    train = train_transform(20)
    assert train(image).shape == (3, 20, 20) and train(image).dtype == torch.uint8
    with pytest.raises(DataError, match="preprocessing must be 'train' or 'eval', got 'test'"):
        build_transform("test", 20, DataConfig())  # type: ignore[arg-type]


def test_with_transform_swaps_resolution_without_rescanning(tree):
    train = build_dataset(cfg_for(tree), "train", train_transform(16))
    finetune = train.with_transform(eval_transform(24))
    assert finetune[0][0].shape == (3, 24, 24) and train[0][0].shape == (3, 16, 16)
    assert finetune._files is train._files  # the same file list, not a new scan


def test_subsets_are_deterministic_and_class_balanced(tree):
    cfg = cfg_for(tree, train_subset=6, val_subset=3)
    train = build_dataset(cfg, "train", eval_transform())
    assert len(train) == 6 and np.bincount(train.targets).tolist() == [2, 2, 2]
    assert_same_samples(train, build_dataset(cfg, "train", eval_transform()))
    assert len(build_dataset(cfg, "val", eval_transform())) == 3
    with pytest.raises(DataError, match="a subset of 13 samples"):
        build_dataset(cfg_for(tree, train_subset=13), "train", eval_transform())


def test_generated_images_are_deterministic_at_the_transform_resolution():
    cfg = DataConfig(dataset="generated", generated_samples=10, generated_classes=4)
    data = build_dataset(cfg, "train", train_transform(16))
    assert len(data) == 10 and data.num_classes == 4 and data.targets.tolist() == [i % 4 for i in range(10)]
    image, label = data[SampleKey(5, seed=0, epoch=0)]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1
    assert torch.equal(image, data[5][0]) and not torch.equal(image, data[6][0])
    assert data.with_transform(eval_transform(8))[5][0].shape == (3, 8, 8)


def test_config_rejects_inverted_crop_ranges():
    with pytest.raises(ValueError, match=r"data.crop_scale: \[0.9, 0.1\]"):
        DataConfig(crop_scale=(0.9, 0.1)).validate()
    with pytest.raises(ValueError, match="data.crop_ratio"):
        DataConfig(crop_ratio=(2.0, 1.0)).validate()


def test_randaugment_is_a_seeded_train_only_step():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    cfg = DataConfig(dataset="generated", randaugment=15)

    def run(t):
        torch.manual_seed(7)
        return t(image)

    plain = build_transform("train", 32, cfg, randaugment=0)
    strong = build_transform("train", 32, cfg)
    assert (strong.randaugment, plain.randaugment, build_transform("eval", 32, cfg).randaugment) == (15, 0, 0)
    assert torch.equal(run(strong), run(strong)) and not torch.equal(run(strong), run(plain))
    assert torch.equal(strong(image, seed=5), strong(image, seed=5))  # keyed: the ambient RNG does not matter
