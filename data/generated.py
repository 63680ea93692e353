"""Random images for throughput work: measures the device and the host→device path, not JPEG decoding."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from data.base import ImageDataset, Sample, SampleKey
from data.transforms import Preprocessing


class GeneratedDataset(ImageDataset):
    """``samples`` uint8 images, each a function of its index alone, with label ``index % classes``.

    They are made directly at the transform's resolution and skip augmentation: the point is to feed the
    model at full speed without decoding or resizing, whatever the host's CPU budget. Swapping the transform
    (``with_transform``) changes the resolution, as for the image data sets.
    """

    transform: Preprocessing

    def __init__(self, samples: int, classes: int, transform: Preprocessing) -> None:
        labels = np.arange(samples, dtype=np.int64) % classes
        super().__init__([f"class{i}" for i in range(classes)], labels, transform, skip_corrupt=False,
                         source=f"generated, {samples} samples")

    def __getitem__(self, key: Union[int, SampleKey]) -> Sample:
        index, _ = self._locate(key)
        j = int(self._index[index])
        size = self.transform.resolution
        pixels = np.random.default_rng(j).bytes(3 * size * size)
        image = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(3, size, size)
        return image, int(self._labels[j])
