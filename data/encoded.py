"""Data sets whose samples are encoded image files (JPEG/PNG bytes in a folder, a tar or a shard)."""

from __future__ import annotations

from io import BytesIO

from PIL import Image

from data.base import ImageDataset


class EncodedImageDataset(ImageDataset):
    """Reading a sample's bytes and decoding them are separate steps: the transform decodes (at the DCT scale its
    crop allows), and ``python -m bench.data`` times the read and the decode apart."""

    def _read(self, j: int) -> bytes:
        """Sample ``j``'s file contents; may raise ``OSError``."""
        raise NotImplementedError

    def _open(self, j: int) -> Image.Image:
        return Image.open(BytesIO(self._read(j)))
