"""What lies where: the ImageNet folder layout shared by the folder and tar data sets (``train/<class>/<image>``
and ``val/<class>/<image>``, or ``test/`` when there is no ``val/``), the shard folder's index, and how
``data.dataset: auto`` tells the kinds apart from ``data.path`` alone (docs/data.md)."""

from __future__ import annotations

import os
from typing import Collection, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from data.errors import DataError

#: torchvision ImageFolder's image suffixes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_DIRS = {"train": ("train",), "val": ("val", "test")}


#: The file ``python -m data.make_shards`` writes last into a shard folder (data/shards.py).
INDEX_FILE = "index.json"
#: A Fashion-MNIST folder as Debian's dataset-fashion-mnist installs it (data/fashion_mnist.py).
FASHION_MNIST_FILE = "train-images-idx3-ubyte.gz"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def infer_dataset(path: Optional[str]) -> Optional[str]:
    """The ``data.dataset`` that ``path`` holds, or None when it is none of them: no path is Fashion-MNIST's
    default place; a ``.tar``/``.tar.gz``/``.tgz`` file a tar; a folder with ``index.json`` shards, with
    ``train-images-idx3-ubyte.gz`` Fashion-MNIST, with ``train/`` an image folder."""
    if path is None:
        return "fashion-mnist"
    if path.lower().endswith(TAR_SUFFIXES) and os.path.isfile(path):
        return "tar"
    for name, kind in ((INDEX_FILE, "shards"), (FASHION_MNIST_FILE, "fashion-mnist")):
        if os.path.isfile(os.path.join(path, name)):
            return kind
    if os.path.isdir(os.path.join(path, "train")):
        return "imagefolder"
    return None


def is_image(name: str) -> bool:
    """An image by suffix (any case); dot files (macOS ``._x.jpg`` resource forks) are not images."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def pick_split_dir(split: str, present: Collection[str], where: str) -> str:
    """The folder holding ``split`` among the top-level folders ``present`` in ``where``."""
    if split not in SPLIT_DIRS:
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    for name in SPLIT_DIRS[split]:
        if name in present:
            return name
    expected = " or ".join(f"{d}/" for d in SPLIT_DIRS[split])
    raise DataError(f"{where} has no {expected} folder for the {split} split; expected the layout "
                    f"train/<class>/*.jpg and val/<class>/*.jpg (or test/<class>/*.jpg); found: "
                    f"{', '.join(sorted(present)) or 'nothing'}")


def class_list(train_classes: Optional[Iterable[str]], split_classes: Iterable[str], where: str) -> List[str]:
    """Sorted class names, taken from ``train/`` whenever it exists so that both splits map a class to the
    same index (a validation folder may lack a class); from the split itself only without ``train/``."""
    classes = sorted(train_classes if train_classes is not None else split_classes)
    if not classes:
        raise DataError(f"no class folders in {where}; expected {where}/<class>/*.jpg")
    return classes


def label_files(files_by_class: Mapping[str, Sequence[str]], classes: Sequence[str],
                where: str) -> Tuple[List[str], np.ndarray]:
    """``<class>/<file>`` keys in a fixed order (class, then file name) and their labels.

    ``files_by_class`` maps each class folder of the split to its image file names.
    """
    index = {name: i for i, name in enumerate(classes)}
    keys: List[str] = []
    labels: List[int] = []
    for name in sorted(files_by_class):
        if name not in index:
            raise DataError(f"class folder {where}/{name} has no counterpart in train/, so it has no label")
        files = sorted(files_by_class[name])
        if not files:
            raise DataError(f"empty class folder {where}/{name}: no {'/'.join(IMAGE_SUFFIXES)} files in it")
        keys.extend(f"{name}/{f}" for f in files)
        labels.extend([index[name]] * len(files))
    if not keys:
        raise DataError(f"no class folders in {where}; expected {where}/<class>/*.jpg")
    return keys, np.asarray(labels, dtype=np.int64)
