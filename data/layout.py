"""The ImageNet folder layout shared by the folder and tar data sets: ``train/<class>/<image>`` and
``val/<class>/<image>`` (or ``test/`` when there is no ``val/``)."""

from __future__ import annotations

from typing import Collection, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from data.errors import DataError

#: torchvision ImageFolder's image suffixes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_DIRS = {"train": ("train",), "val": ("val", "test")}


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
