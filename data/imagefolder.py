"""JPEG/PNG files in an ImageNet-style folder tree (see ``data.layout``)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from data.encoded import EncodedImageDataset
from data.errors import DataError
from data.layout import class_list, is_image, label_files, pick_split_dir
from data.transforms import Preprocessing


def _subdirs(path: str) -> List[str]:
    with os.scandir(path) as entries:
        return [e.name for e in entries if e.is_dir()]


def _images(path: str) -> List[str]:
    with os.scandir(path) as entries:
        return [e.name for e in entries if is_image(e.name) and e.is_file()]


class ImageFolderDataset(EncodedImageDataset):
    """One ``os.scandir`` pass over the split's folders at construction; file names are then kept as one
    numpy bytes array (not a list of str, whose reference counts would make every forked worker copy it)."""

    def __init__(self, root: str, split: str, transform: Preprocessing, skip_corrupt: bool = False) -> None:
        if not os.path.isdir(root):
            raise DataError(f"imagefolder data set: {root} is not a folder "
                            f"(expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
        split_dir = pick_split_dir(split, _subdirs(root), root)
        self.folder = os.path.join(root, split_dir)
        split_classes = _subdirs(self.folder)
        train_dir = os.path.join(root, "train")
        train_classes: Optional[List[str]] = _subdirs(train_dir) if os.path.isdir(train_dir) else None
        classes = class_list(train_classes, split_classes, train_dir if train_classes is not None else self.folder)
        files: Dict[str, List[str]] = {name: _images(os.path.join(self.folder, name)) for name in split_classes}
        keys, labels = label_files(files, classes, self.folder)
        self._files = np.array([os.fsencode(k) for k in keys])
        super().__init__(classes, labels, transform, skip_corrupt, source=self.folder)

    def _name(self, j: int) -> str:
        return os.path.join(self.folder, os.fsdecode(self._files[j]))

    def _read(self, j: int) -> bytes:
        with open(self._name(j), "rb") as f:
            return f.read()
