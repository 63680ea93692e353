"""Pillow's resize, with Pillow's pixels, about 2.4x faster: ``resample.c`` built at set-up (:mod:`data.native`,
``make native``) and called through ctypes on the JPEG decoders' RGBX arrays (see docs/data.md, "The resize").

Pillow 13 chose a new pass order (vertical first when the height shrinks by more than twice as many pixels as
the width); the order follows the installed Pillow's major version. Loading checks the result against the
installed Pillow on a set of boxes that takes every branch, so a Pillow that resizes differently makes this
unavailable (``unavailable_reason``) and the pipeline asks Pillow instead: slower, never different. Used on
x86-64 only (:data:`CHECKED_MACHINES`).
"""

from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import PIL
from PIL import Image

from data import native
from data.native import BuildError

SOURCE = Path(__file__).with_name("resample.c")
RESIZED = 0  # what effnet_resize returns on success (1: out of memory, 2: a request it does not take)
FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
PILLOW13_ORDER = PILLOW_MAJOR >= 13

BoxF = Tuple[float, float, float, float]  # left, top, right, bottom in source pixels (fractional)

#: Where the C resize has been checked against Pillow's builds: x86-64, where neither may fuse multiply-adds
#: without being asked to. Pillow's wheels for other CPUs are compiled with GCC's default contraction, which can
#: move a filter weight by one unit in the last place, and so a value by one level.
CHECKED_MACHINES = ("x86_64", "AMD64")

#: (source width, height, box, output size, filter) that the load-time check compares with Pillow: shrink and
#: enlarge (three-, five-, seven-tap and longer filters), either pass alone, Pillow 13's vertical-first rule at
#: and one pixel past its threshold and with the width growing, a source narrower than the filter, Pillow's copy.
_CHECKS = (
    (61, 47, (3.3, 2.1, 57.9, 44.6), (23, 19), Image.Resampling.BILINEAR),
    (20, 15, (0.5, 0.5, 19.5, 14.5), (53, 41), Image.Resampling.BILINEAR),
    (61, 47, (0.0, 0.0, 61.0, 47.0), (97, 83), Image.Resampling.BICUBIC),
    (97, 83, (1.5, 2.5, 95.0, 80.0), (23, 19), Image.Resampling.BICUBIC),
    (61, 47, (0.0, 0.0, 61.0, 47.0), (30, 47), Image.Resampling.BILINEAR),
    (61, 47, (0.0, 5.5, 61.0, 40.0), (61, 20), Image.Resampling.BICUBIC),
    (61, 47, (0.0, 0.0, 61.0, 47.0), (51, 27), Image.Resampling.BILINEAR),
    (61, 47, (0.0, 0.0, 61.0, 47.0), (51, 26), Image.Resampling.BILINEAR),
    (30, 47, (0.2, 0.0, 29.9, 46.5), (45, 20), Image.Resampling.BICUBIC),
    (40, 90, (1.2, 0.7, 39.1, 88.8), (36, 12), Image.Resampling.BILINEAR),
    (3, 47, (0.4, 1.0, 2.9, 46.0), (9, 21), Image.Resampling.BICUBIC),
    (61, 47, (7.0, 4.0, 31.0, 20.0), (24, 16), Image.Resampling.BILINEAR),
)


# -ffp-contract=off: no fused multiply-add in the weights, which Pillow's build computes without.
HELPER = native.Helper("resample", SOURCE, ("-O3", "-ffp-contract=off"), ("-lm",),
                       "the C library's headers are in Debian's libc6-dev (gcc brings it)")


def _call(library: ctypes.CDLL, pixels: np.ndarray, box: BoxF, size: Tuple[int, int], resample: int,
          simd: bool) -> Optional[np.ndarray]:
    height, width = pixels.shape[:2]
    out = np.empty((size[1], size[0], 4), dtype=np.uint8)
    status = library.effnet_resize(pixels.ctypes.data, width, height, pixels.strides[0], *box, size[0], size[1],
                                   int(resample), int(PILLOW13_ORDER), int(simd), out.ctypes.data)
    return out if status == RESIZED else None


def _setup(library: ctypes.CDLL) -> ctypes.CDLL:
    library.effnet_resize.restype = ctypes.c_int
    library.effnet_resize.argtypes = (  # in, width, height, stride, box (4 floats), out size, filter, flags, out
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_float,
        ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    library.effnet_resize_simd.restype = ctypes.c_int
    rng = np.random.default_rng(0)
    for width, height, box, size, resample in _CHECKS:
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        pixels[:, :, 3] = 255
        expected = np.asarray(_as_image(pixels).resize(size, resample, box=box))
        for simd in (False, True):
            got = _call(library, pixels, box, size, resample, simd)
            if got is None or not np.array_equal(got, expected):
                raise BuildError(f"resample.c resizes differently from Pillow {PIL.__version__} "
                                 f"({width}x{height} box {box} to {size}, {'SIMD' if simd else 'scalar'} loops)")
    return library


@functools.lru_cache(maxsize=1)
def _library() -> Tuple[Optional[ctypes.CDLL], str]:
    """The loaded library, or None and why not (tried once per process; forked workers inherit it)."""
    if platform.machine() not in CHECKED_MACHINES:
        return None, (f"checked against Pillow on x86-64 only, not {platform.machine()}, where Pillow's build may "
                      "fuse the multiply-adds of its filter weights")
    return HELPER.load(_setup)


def unavailable_reason() -> str:
    """Empty where the C resize works here, else one line saying why it does not."""
    return _library()[1]


def in_use() -> str:
    """What resizes the fast decoders' crops here, for reports: ``C, SSE4.1``, ``C, scalar`` (a CPU without
    SSE4.1: same pixels, slower), or ``Pillow (why not C)``."""
    library, reason = _library()
    if library is None:
        return f"Pillow ({reason})"
    return "C, SSE4.1" if library.effnet_resize_simd() else "C, scalar"


def _as_image(pixels: np.ndarray) -> Image.Image:
    """An RGBX image sharing ``pixels`` (C-contiguous [H, W, 4] uint8)."""
    return Image.frombuffer("RGBX", (pixels.shape[1], pixels.shape[0]), pixels, "raw", "RGBX", 0, 1)


def resize_rgbx(pixels: np.ndarray, size: Tuple[int, int], resample: int, box: BoxF, *,
                simd: bool = True) -> Image.Image:
    """``Image.resize(size, resample, box=box)`` of the RGBX array ``pixels`` ([H, W, 4] uint8 with contiguous
    rows), as an RGBX image with Pillow's pixels. Pillow itself resizes where this library is unavailable, for
    other filters, for a box Pillow rejects (it raises its own error), and where Pillow 12 splits the resize of a
    very tall image in two. ``simd=False`` runs the scalar loops (the tests compare both)."""
    library = _library()[0]
    height, width = pixels.shape[:2]
    tall_split = not PILLOW13_ORDER and height > width * 100 and size[1] < height
    if (library is not None and resample in FILTERS and not tall_split and pixels.dtype == np.uint8
            and pixels.ndim == 3 and pixels.shape[2] == 4 and pixels.strides[1:] == (4, 1)):
        resized = _call(library, pixels, box, size, resample, simd)
        if resized is not None:
            return _as_image(resized)
    return _as_image(np.ascontiguousarray(pixels)).resize(size, resample, box=box)
