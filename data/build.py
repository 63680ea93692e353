"""``data.dataset`` → a data set object."""

from __future__ import annotations

import os
from typing import Literal

from data.base import ImageDataset
from data.config import FASHION_MNIST_PATH, DataConfig
from data.errors import DataError
from data.fashion_mnist import FashionMNISTDataset
from data.generated import GeneratedDataset
from data.imagefolder import ImageFolderDataset
from data.shards import ShardDataset
from data.tar import TarDataset
from data.transforms import Preprocessing

#: The two splits every data set has.
Split = Literal["train", "val"]


def build_dataset(cfg: DataConfig, split: Split, transform: Preprocessing) -> ImageDataset:
    """The ``split`` of the configured data set, cut to ``train_subset``/``val_subset`` when set.

    Swap the transform later with ``dataset.with_transform(...)``; that does not re-read the files.
    """
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.dataset in ("imagefolder", "tar", "shards") and not cfg.path:
        raise DataError(f"data.path is required for data.dataset {cfg.dataset!r}")
    dataset: ImageDataset
    if cfg.dataset == "fashion-mnist":
        dataset = FashionMNISTDataset(os.path.expanduser(cfg.path or FASHION_MNIST_PATH), split, transform)
    elif cfg.dataset == "imagefolder":
        dataset = ImageFolderDataset(os.path.expanduser(str(cfg.path)), split, transform, cfg.skip_corrupt)
    elif cfg.dataset == "tar":
        dataset = TarDataset(os.path.expanduser(str(cfg.path)), split, transform, cfg.skip_corrupt)
    elif cfg.dataset == "shards":
        dataset = ShardDataset(os.path.expanduser(str(cfg.path)), split, transform, cfg.skip_corrupt,
                               cfg.shuffle_buffer)
    elif cfg.dataset == "generated":
        dataset = GeneratedDataset(cfg.generated_samples, cfg.generated_classes, transform)
    else:
        raise DataError(f"data.dataset: unknown data set {cfg.dataset!r}; "
                        "expected fashion-mnist, imagefolder, tar, shards or generated")
    subset = cfg.train_subset if split == "train" else cfg.val_subset
    return dataset if subset is None else dataset.subset(subset)
