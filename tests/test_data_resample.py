"""data.resample: the C resize gives Pillow's pixels, on every box, in both loops, with this Pillow's pass order."""

from __future__ import annotations

import random
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from conftest import needs_c_resize
from data import resample
from data.native import BuildError

FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """RGBX pixels of a JPEG-compressed smooth image with noise: both the flat areas and the edges of a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width, 1)), (y * 255 // max(height, 1)), ((x + y) * 3) % 256], axis=-1)
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    encoded = BytesIO()
    Image.fromarray(noisy).save(encoded, format="JPEG", quality=85)
    return np.asarray(Image.open(encoded).convert("RGBX")).copy()


def random_case(rng: random.Random, trial: int):
    """An RGBX array (a view into a wider one, so rows have a stride), a box, an output size and a filter: mostly
    training-like crops, plus tiny, very tall, whole-image and exact-crop requests."""
    kind = trial % 6
    width, height = rng.randint(1, 320), rng.randint(1, 320)
    if kind == 1:
        width, height = rng.randint(1, 4), rng.randint(300, 500)  # Pillow 12 splits very tall images in two
    wide = photo(width + 7, height, trial) if trial % 2 else np.random.default_rng(trial).integers(
        0, 256, (height, width + 7, 4), dtype=np.uint8)
    wide[:, :, 3] = 255
    pixels = wide[:, 3:3 + width]
    x0, y0 = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
    box = (x0, y0, rng.uniform(x0 + 0.1, width), rng.uniform(y0 + 0.1, height))
    size = rng.choice([(160, 160), (224, 224), (rng.randint(1, 260), rng.randint(1, 260))])
    if kind == 2:
        box = (0.0, 0.0, float(width), float(height))
    elif kind == 3 and width > 2 and height > 2:  # a box of exactly the output size: Pillow copies
        left, top = rng.randint(0, width - 2), rng.randint(0, height - 2)
        size = (rng.randint(1, width - left), rng.randint(1, height - top))
        box = (float(left), float(top), float(left + size[0]), float(top + size[1]))
    return pixels, box, size, rng.choice(FILTERS)


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
def test_resize_gives_pillows_pixels_on_random_boxes(simd):
    needs_c_resize()
    library = resample._library()[0]
    rng = random.Random(0)
    for trial in range(900):
        pixels, box, size, resample_filter = random_case(rng, trial)
        expected = np.asarray(Image.fromarray(np.ascontiguousarray(pixels), "RGBX").resize(size, resample_filter,
                                                                                          box=box))
        tall_split = not resample.PILLOW13_ORDER and pixels.shape[0] > pixels.shape[1] * 100 and size[1] < \
            pixels.shape[0]
        if tall_split:  # Pillow 12 resizes these in two calls; resize_rgbx leaves them to it
            got = np.asarray(resample.resize_rgbx(pixels, size, resample_filter, box, simd=simd))
        else:  # the C function itself, so that a silent fallback to Pillow cannot pass for it
            got = resample._call(library, pixels, box, size, resample_filter, simd)
            assert got is not None, f"case {trial}: the C resize declined {box} to {size}"
        assert got.shape == expected.shape
        if not np.array_equal(got, expected):
            worst = int(np.abs(got.astype(int) - expected).max())
            pytest.fail(f"case {trial}: {pixels.shape[1]}x{pixels.shape[0]} box {box} to {size}, filter "
                        f"{resample_filter}: differs from Pillow by up to {worst}")


def test_the_load_check_catches_a_pillow_with_the_other_pass_order(monkeypatch):
    """What guards against a future Pillow resizing differently: the check on load compares with the installed
    Pillow, and the pass order alone is enough to fail it."""
    needs_c_resize()
    library = resample._library()[0]
    resample._setup(library)  # passes as is
    monkeypatch.setattr(resample, "PILLOW13_ORDER", not resample.PILLOW13_ORDER)
    with pytest.raises(BuildError, match="resizes differently from Pillow"):
        resample._setup(library)


def test_without_the_library_pillow_resizes_and_reports_why(monkeypatch):
    monkeypatch.setattr(resample, "_library", lambda: (None, "no C compiler (cc: not found)"))
    pixels = photo(50, 40, 0)
    box = (2.5, 1.25, 47.0, 39.0)
    expected = Image.fromarray(pixels, "RGBX").resize((16, 16), Image.Resampling.BILINEAR, box=box)
    assert np.array_equal(np.asarray(resample.resize_rgbx(pixels, (16, 16), Image.Resampling.BILINEAR, box)),
                          np.asarray(expected))
    assert resample.in_use() == "Pillow (no C compiler (cc: not found))"


def test_only_where_it_was_checked(monkeypatch):
    monkeypatch.setattr(resample.platform, "machine", lambda: "aarch64")
    library, reason = resample._library.__wrapped__()
    assert library is None and reason.startswith("checked against Pillow on x86-64 only, not aarch64"), reason


def test_a_box_pillow_rejects_raises_pillows_error():
    pixels = photo(20, 10, 0)
    with pytest.raises(ValueError, match="box can't exceed original image size"):
        resample.resize_rgbx(pixels, (8, 8), Image.Resampling.BILINEAR, (0.0, 0.0, 25.0, 10.0))


def test_building_a_transform_loads_it_before_loader_workers_fork():
    """Workers are forked from the process that built the transform: loaded there, the library (and its check)
    is inherited instead of loaded again, or compiled side by side on a cold cache, in every worker."""
    from data import DataConfig, build_transform

    resample._library.cache_clear()
    build_transform("eval", 32, DataConfig(fused_decode=False))
    assert resample._library.cache_info().currsize == 0  # the plain path: Pillow resizes whole decodes
    build_transform("train", 32, DataConfig(jpeg_decoder="pillow"))  # every decoder's crops go through it
    assert resample._library.cache_info().currsize == 1
