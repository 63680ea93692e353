"""Data sets, host preprocessing and loaders. Samples are ``(uint8 tensor [3, S, S], int label)``."""

from data.base import ImageDataset, SampleKey
from data.build import build_dataset
from data.config import DataConfig
from data.errors import DataError
from data.loader import EpochLoader, ShardedBatchSampler, batch_sampler_for, build_loader
from data.transforms import Preprocessing, build_transform

__all__ = [
    "DataConfig", "DataError", "EpochLoader", "ImageDataset", "Preprocessing", "SampleKey", "ShardedBatchSampler",
    "batch_sampler_for", "build_dataset", "build_loader", "build_transform",
]
