"""Every mode Pillow decodes becomes correct 8-bit RGB, through the real image-folder data set.

Each case writes a real file in a format that keeps the mode (PNG, TIFF, JPEG, PGM), reads it back through
``ImageFolderDataset`` and checks the pixels against the value the mode's full range maps to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataConfig, build_transform
from data.base import to_rgb
from data.imagefolder import ImageFolderDataset

#: The eval transform at the file's own size: resizing and cropping a one-colour image keeps its colour exactly.
EVAL4 = build_transform("eval", 4, DataConfig())

# mode, file suffix, the value written, and the 8-bit RGB expected back.
CASES = [
    ("1", ".png", 1, (255, 255, 255)),
    ("L", ".png", 77, (77, 77, 77)),
    ("LA", ".png", (77, 10), (77, 77, 77)),
    ("P", ".png", None, (10, 20, 30)),
    ("PA", ".tif", None, (10, 20, 30)),
    ("RGBA", ".png", (10, 20, 30, 40), (10, 20, 30)),
    ("CMYK", ".tif", (0, 255, 255, 0), (255, 0, 0)),
    ("CMYK", ".jpg", (0, 0, 0, 0), (255, 255, 255)),
    ("LAB", ".tif", (255, 128, 128), (254, 255, 254)),
    ("I;16", ".png", 40000, (156, 156, 156)),  # round(40000 * 255 / 65535) = 156; convert("RGB") gives 255
    ("I;16", ".tif", 65535, (255, 255, 255)),
    ("I;16B", ".tif", 257 * 100, (100, 100, 100)),
    ("I", ".tif", 2**31 - 1, (255, 255, 255)),  # 32-bit signed TIFF: full scale 2^31 - 1
    ("I", ".tif", 2**30, (128, 128, 128)),
    ("I", ".pgm", 257 * 40, (40, 40, 40)),  # a 16-bit PGM decodes to mode I
    ("F", ".tif", 0.5, (128, 128, 128)),
    ("F", ".tif", 2.0, (255, 255, 255)),  # floats are taken to span [0, 1]; above is clipped
]


def _image(mode: str, value) -> Image.Image:
    if mode == "P":
        image = Image.new("P", (4, 4), 3)
        image.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
        return image
    if mode == "PA":
        image = Image.new("PA", (4, 4), (3, 200))
        image.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
        return image
    return Image.new(mode, (4, 4), value)


@pytest.mark.parametrize("mode, suffix, value, rgb", CASES, ids=[f"{c[0]}{c[1]}-{c[2]}" for c in CASES])
def test_every_mode_becomes_8_bit_rgb(tmp_path: Path, mode, suffix, value, rgb):
    folder = tmp_path / "train" / "only"
    folder.mkdir(parents=True)
    path = folder / f"image{suffix}"
    _image(mode, value).save(path)
    with Image.open(path) as written:
        assert written.mode == ("I" if suffix == ".pgm" else mode)  # the file really holds that mode
    image, _ = ImageFolderDataset(str(tmp_path), "train", EVAL4)[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 4)
    pixels = image.permute(1, 2, 0).numpy()
    assert np.abs(pixels.astype(int) - np.array(rgb)).max() <= 1, (mode, suffix, pixels[0, 0], rgb)


@pytest.mark.parametrize("mode, value, rgb", [
    ("La", (77, 255), (77, 77, 77)), ("RGBa", (10, 20, 30, 255), (10, 20, 30)), ("RGBX", (10, 20, 30, 0), (10, 20, 30)),
    ("HSV", (0, 255, 255), (255, 0, 0)), ("YCbCr", (235, 128, 128), (235, 235, 235)), ("I;16L", 65535, (255, 255, 255)),
    ("I;16N", 0, (0, 0, 0)),
])
def test_modes_without_a_file_format_convert_too(mode, value, rgb):
    """Modes Pillow decodes into but cannot write, or whose files decode to RGB with some libtiff builds
    (YCbCr): converted in memory by the same function."""
    out = to_rgb(Image.new(mode, (4, 4), value))
    assert out.mode == "RGB" and np.abs(np.asarray(out).astype(int) - np.array(rgb)).max() <= 1
