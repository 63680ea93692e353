"""The ``data`` config section: which data set, where it is, and how it is augmented and loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

from data.host import default_workers
from data.layout import infer_dataset

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"


@dataclass
class DataConfig:
    dataset: Literal["auto", "fashion-mnist", "imagefolder", "tar", "shards", "generated"] = field(
        default="auto",
        metadata={"help": "imagefolder: train/<class>/* + val/ (or test/); tar: such a tree in a .tar/.tar.gz; "
                          "shards: a folder made by python -m data.make_shards (each rank reads its own); "
                          "generated: random images for throughput work; auto = what data.path holds (a tarball, "
                          "a folder with index.json, Fashion-MNIST's files or train/), Fashion-MNIST without a "
                          "path; the resolved kind is what the run records"})
    path: Optional[str] = field(
        default=None,
        metadata={"help": f"folder, tarball or shard folder; fashion-mnist defaults to {FASHION_MNIST_PATH}"})
    workers: Optional[int] = field(
        default=None, metadata={"min": 0, "help": "DataLoader worker processes per rank; null = the CPU cores this "
                                                  "process may use, shared among the ranks on the host, minus one"})
    prefetch_factor: int = field(default=2, metadata={"min": 1, "help": "batches each worker prepares ahead"})
    pin_memory: bool = field(default=True, metadata={"help": "pin host batches (used only with CUDA)"})
    persistent_workers: bool = field(
        default=True, metadata={"help": "keep workers alive between epochs (torch backend; the PopTorch loader "
                                        "is rebuilt per epoch)"})
    fused_decode: bool = field(
        default=True, metadata={"help": "pick the crop first and decode JPEGs at the coarsest DCT scale it allows "
                                        "(1/2, 1/4, 1/8); false = always decode at full size"})
    jpeg_decoder: Literal["auto", "region", "simplejpeg", "pillow"] = field(
        default="auto", metadata={"help": "fused decode's JPEG decoder, all with the same pixels: region = only the "
                                          "crop (a C library built at set-up by make native; needs cc and libjpeg "
                                          "headers), simplejpeg or pillow = the whole frame; auto = the first that "
                                          "works"})
    shuffle_buffer: int = field(
        default=10000, metadata={"min": 1, "help": "shards: samples in the seeded shuffle buffer of each rank"})
    crop_scale: Tuple[float, float] = field(
        default=(0.05, 1.0), metadata={"help": "Inception crop: area range as fractions of the image"})
    crop_ratio: Tuple[float, float] = field(
        default=(0.75, 1.3333), metadata={"help": "Inception crop: aspect-ratio range"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips in training"})
    eval_crop_pct: float = field(
        default=0.875, metadata={"min": 0.0, "max": 1.0,
                                 "help": "eval transform: resize the shorter side to floor(S / eval_crop_pct), then "
                                         "keep the centre S x S (0.875 = torchvision's 256 -> 224; timm's "
                                         "crop_pct; 1.0 = no margin)"})
    interpolation: Literal["bilinear", "bicubic"] = field(
        default="bilinear", metadata={"help": "eval transform's resize filter (validation, fine-tune with eval "
                                              "preprocessing, predict, export); training crops stay bilinear"})
    randaugment: Optional[float] = field(
        default=None, metadata={"min": 0.0, "max": 30.0,
                                "help": "RandAugment magnitude (2 ops) in training; null = off (the paper uses none)"})
    skip_corrupt: bool = field(
        default=False, metadata={"help": "replace undecodable images by the next sample (with a warning) "
                                         "instead of stopping"})
    train_subset: Optional[int] = field(
        default=None, metadata={"min": 1, "help": "use only this many training samples, class-balanced"})
    val_subset: Optional[int] = field(
        default=None, metadata={"min": 1, "help": "use only this many validation samples, class-balanced"})
    generated_samples: int = field(default=1024, metadata={"min": 1, "help": "size of the generated data set"})
    generated_classes: int = field(default=1000, metadata={"min": 1, "help": "labels of the generated data set"})

    def __post_init__(self) -> None:
        # ``workers: null`` becomes the machine's count as soon as the section exists, so every backend gets a
        # number and the saved config.yaml records the one that ran (see docs/data.md).
        if self.workers is None:
            self.workers = default_workers()
        # ``auto`` becomes the kind data.path holds, for the same reason; validate() names a path it cannot tell.
        if self.dataset == "auto":
            self.dataset = infer_dataset(self.path) or "auto"  # type: ignore[assignment]

    def validate(self) -> None:
        """Cross-field checks the generic loader cannot do from type hints alone."""
        if self.dataset == "auto":
            what = "does not exist" if self.path and not os.path.exists(self.path) else "holds no data set it knows"
            raise ValueError(f"data.dataset auto: data.path {self.path} {what} (a .tar/.tar.gz/.tgz file, or a "
                             "folder with train/<class>/ images, index.json shards or Fashion-MNIST's "
                             "train-images-idx3-ubyte.gz); fix the path or set data.dataset")
        if self.dataset in ("imagefolder", "tar", "shards") and not self.path:
            raise ValueError(f"data.path is required for data.dataset {self.dataset!r}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"data.crop_scale: {list(self.crop_scale)} must satisfy 0 < min <= max <= 1")
        if self.eval_crop_pct <= 0.0:
            raise ValueError(f"data.eval_crop_pct: {self.eval_crop_pct} must be above 0 (at most 1)")
        low, high = self.crop_ratio
        if not 0.0 < low <= high:
            raise ValueError(f"data.crop_ratio: {list(self.crop_ratio)} must satisfy 0 < min <= max")
