"""Fashion-MNIST from its idx files, as Debian's ``dataset-fashion-mnist`` package installs them."""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Tuple

import numpy as np
from PIL import Image

from data.base import ImageDataset
from data.errors import DataError
from data.transforms import Preprocessing

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILE_PREFIX = {"train": "train", "val": "t10k"}
INSTALL_HINT = "install it with `sudo apt-get install dataset-fashion-mnist` or `make data`"
IDX_UBYTE = 0x08  # the idx type code of unsigned bytes, the only type Fashion-MNIST uses


def read_idx(path: str, ndim: int) -> np.ndarray:
    """A gzipped idx file (big-endian header: two zero bytes, type code, rank, then one uint32 per dimension)
    as a uint8 array, with every header field and the payload length checked."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"fashion-mnist file {path} is corrupt or truncated: {err}") from err
    header = 4 + 4 * ndim
    expected_magic = bytes([0, 0, IDX_UBYTE, ndim])
    if len(data) < header or data[:4] != expected_magic:
        raise DataError(f"fashion-mnist file {path} is not a {ndim}-d uint8 idx file: it starts with "
                        f"{data[:4].hex()}, expected {expected_magic.hex()}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"fashion-mnist file {path} is truncated or padded: its header announces {shape} "
                        f"= {int(np.prod(shape))} bytes of data, it holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(root: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] and labels [N] of ``split`` (``val`` is the 10k test set)."""
    if not os.path.isdir(root):
        raise DataError(f"fashion-mnist data set: {root} does not exist; {INSTALL_HINT}, "
                        "or set data.path to a folder holding its *-idx*-ubyte.gz files")
    prefix = FILE_PREFIX[split]
    images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    labels_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    for path in (images_path, labels_path):
        if not os.path.isfile(path):
            raise DataError(f"fashion-mnist data set: {path} is missing; {INSTALL_HINT}")
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(f"fashion-mnist: {images_path} holds {len(images)} images but {labels_path} "
                        f"holds {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"fashion-mnist file {labels_path} holds label {labels.max()}; labels are 0-9")
    return images, labels


class FashionMNISTDataset(ImageDataset):
    """28×28 grayscale clothing images in 10 classes, held in memory (47 MB for the training split)."""

    def __init__(self, root: str, split: str, transform: Preprocessing) -> None:
        if split not in FILE_PREFIX:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        self._images, labels = load_split(root, split)
        self._images_file = os.path.join(root, f"{FILE_PREFIX[split]}-images-idx3-ubyte.gz")
        super().__init__(list(CLASSES), labels, transform, skip_corrupt=False, source=root)

    def _name(self, j: int) -> str:
        return f"{self._images_file} (image {j})"

    def _open(self, j: int) -> Image.Image:
        return Image.fromarray(self._images[j])
