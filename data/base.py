"""What every data set shares: keyed, reproducible augmentation; the corrupt-image policy; subsets; and
swapping the transform without re-scanning files."""

from __future__ import annotations

import copy
import operator
import warnings
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple, TypeVar, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.errors import DataError
from data.seeding import derive_seed
from data.skips import SkipCounter

if TYPE_CHECKING:  # (annotations only: data.loader and data.transforms build on this module)
    from data.loader import EpochBatchSampler
    from data.transforms import Preprocessing

Sample = Tuple[torch.Tensor, int]
D = TypeVar("D", bound="ImageDataset")

# What PIL raises for undecodable, truncated or vanished files (UnidentifiedImageError is an OSError;
# some broken PNG/JPEG headers raise SyntaxError or ValueError; a decompression bomb is a data problem too).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
MAX_CONSECUTIVE_SKIPS = 16


class SampleKey(NamedTuple):
    """The index a sampler hands to ``dataset[...]``: the sample plus what seeds its augmentation.

    The epoch travels with every index (instead of living in the data set) because DataLoader workers hold
    their own copies of the data set, which the main process cannot update between epochs.
    """

    index: int  # type: ignore[assignment]  # (a field, shadowing tuple.index, which nothing here calls)
    seed: int
    epoch: int


class ImageDataset(Dataset):
    """Base class: samples are ``(uint8 tensor [3, S, S], int label)``.

    Subclasses store their samples compactly (numpy arrays, so forked workers do not copy them through
    reference counting) and implement ``_open`` and ``_name``; ``_labels[j]`` is sample ``j``'s label. The
    transform decodes what ``_open`` returns, so that it can decode a JPEG only as finely as its crop needs.

    Indexing with a :class:`SampleKey` makes the augmentation a function of (seed, epoch, index) alone; a
    plain int index uses the ambient torch RNG like any torchvision data set.

    Corrupt images raise :class:`DataError` naming the file, or with ``skip_corrupt`` are replaced by the next
    decodable sample (same key, so still deterministic), with a warning naming the file; ``skipped`` counts
    them across all workers and copies of this data set.
    """

    def __init__(self, classes: List[str], labels: np.ndarray, transform: Preprocessing, skip_corrupt: bool,
                 source: str) -> None:
        self.classes = classes
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.source = source
        self._labels = np.asarray(labels, dtype=np.int64)
        self._index = np.arange(len(self._labels), dtype=np.int64)
        self._skips = SkipCounter()

    # -- to implement ------------------------------------------------------------------------------------
    def _open(self, j: int) -> Image.Image:
        """Sample ``j`` as a PIL image, opened but possibly not yet decoded; may raise any of ``DECODE_ERRORS``."""
        raise NotImplementedError

    def _name(self, j: int) -> str:
        """Sample ``j``'s file, as the user would look for it."""
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> np.ndarray:
        """The label of each sample, in index order."""
        return self._labels[self._index]

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far, summed over every process using this data set."""
        return self._skips.value

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source}, {len(self)} samples, {self.num_classes} classes)"

    def stream_sampler(self, batch_size: int, *, seed: int, rank: int, world_size: int,
                       drop_last: bool) -> Optional[EpochBatchSampler]:
        """The training sampler of a data set stored in shards that each rank reads on its own; None (here):
        shuffle by a permutation of all samples (:class:`data.loader.ShardedBatchSampler`)."""
        return None

    def with_transform(self: D, transform: Preprocessing) -> D:
        """A view of the same files with another transform (e.g. for the fine-tuning phase); no re-scan.

        A copy rather than an in-place change, so a loader still iterating the old view is unaffected.
        The skip count is shared with the original.
        """
        view = copy.copy(self)
        view.transform = transform
        return view

    def same_view(self, other: "ImageDataset") -> bool:
        """Whether ``other`` holds the same samples under an equal transform (a ``with_transform`` copy counts),
        so that a loader built for one serves the other: its workers' copies would produce the same samples."""
        return type(other) is type(self) and other._index is self._index and other.transform == self.transform

    def subset(self: D, size: int) -> D:
        """A deterministic, class-balanced view of ``size`` samples: round-robin over classes, each class's
        samples in file order. Needs no seed, so every rank and every run picks the same samples."""
        if size > len(self):
            raise DataError(f"a subset of {size} samples was asked of {self}, which has only {len(self)}")
        labels = self.targets
        rank_in_class = np.empty(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            rank_in_class[members] = np.arange(len(members))
        chosen = np.lexsort((labels, rank_in_class))[:size]
        view = copy.copy(self)
        view._index = self._index[np.sort(chosen)]
        return view

    def _locate(self, key: Union[int, SampleKey]) -> Tuple[int, Optional[int]]:
        """The position ``key`` points at, and its augmentation seed (``None`` for a plain int)."""
        if isinstance(key, SampleKey):
            index, seed = key.index, derive_seed(key.seed, key.epoch, key.index)
        else:
            index, seed = operator.index(key), None
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self}")
        return index, seed

    def __getitem__(self, key: Union[int, SampleKey]) -> Sample:
        index, seed = self._locate(key)
        for attempt in range(MAX_CONSECUTIVE_SKIPS + 1):
            j = int(self._index[(index + attempt) % len(self)])
            draws = self.transform.draws(seed)
            try:
                region = self.transform.region(self._open(j), draws)
            except DECODE_ERRORS as err:
                if not self.skip_corrupt:
                    raise DataError(f"corrupt image {self._name(j)}: {err} "
                                    f"(set data.skip_corrupt: true to skip such files)") from err
                self._skips.increment()
                warnings.warn(f"skipping corrupt image {self._name(j)}: {err}", stacklevel=2)
                continue
            return self.transform.finish(region, draws, seed), int(self._labels[j])
        raise DataError(f"{MAX_CONSECUTIVE_SKIPS + 1} consecutive corrupt images from sample {index} of {self}; "
                        "is the data set readable at all?")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image decoded in full, as 8-bit RGB: PIL decodes lazily, so this is where a corrupt file fails (inside
    the corrupt-image handling, not later in the transform).

    ``convert("RGB")`` is right for the 8-bit modes (grey, palette, alpha — dropped, as torchvision's loader does —
    CMYK, YCbCr, LAB, HSV) but clips deeper ones to 255, so 16-bit greys would turn white: integer and float
    images are scaled from their full range instead (see :func:`high_depth_to_grey`).
    """
    image.load()
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return high_depth_to_grey(image).convert("RGB")
    if image.mode == "La":  # premultiplied alpha: Pillow converts it only through LA
        image = image.convert("LA")
    return image.convert("RGB")


def high_depth_to_grey(image: Image.Image) -> Image.Image:
    """An ``I;16*``, ``I`` or ``F`` image as 8-bit grey, ``round(v * 255 / full scale)`` clipped to 0..255.

    Full scale: 65535 for 16-bit modes; for ``I`` the bit depth the TIFF declares (BitsPerSample, signed when
    SampleFormat is 2), else 16 bits (16-bit PGM/PPM decode to ``I``); float images are taken to span [0, 1].
    """
    pixels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        full_scale = 1.0
    elif image.mode == "I":
        tags = getattr(image, "tag_v2", {})
        bits = int(tags.get(258, (16,))[0])
        full_scale = float(2 ** (bits - 1) - 1 if tags.get(339, (1,))[0] == 2 else 2 ** bits - 1)
    else:
        full_scale = 65535.0
    grey = np.clip(np.rint(pixels * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L")
