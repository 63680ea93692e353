"""Decoding only a JPEG's crop: ``jpeg_region.c``, built at set-up (:mod:`data.native`, ``make native``) against
the system libjpeg's headers (Debian: ``gcc`` and ``libjpeg62-turbo-dev``) into
``$XDG_CACHE_HOME/effnet-ipu/jpeg-region/`` and called through ctypes (see docs/data.md, "Decoding only the crop").
Loading checks it on a small image against Pillow. Where it is not built or fails the check,
:func:`unavailable_reason` says why and the fused decode uses a full-frame decoder instead.
"""

from __future__ import annotations

import ctypes
import functools
import os
from io import BytesIO
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image

from data import native
from data.native import BuildError

SOURCE = Path(__file__).with_name("jpeg_region.c")
DECODED = 0  # what effnet_decode_region returns on success (1: libjpeg error, 2: warning, 3: bad request)

Rect = Tuple[int, int, int, int]  # left, top, right, bottom in decoded pixels


def _system_libjpeg(compiler: List[str]) -> str:
    """The libjpeg the compiler links against, as a real path (the shared object opens it by this path): what
    ``-print-file-name`` answers, else the first ``libjpeg.so`` in the compiler's library directories
    (``-print-search-dirs``; a compiler may answer the first with the bare name)."""
    named = native.run_compiler([*compiler, "-print-file-name=libjpeg.so"], "finding libjpeg").stdout.strip()
    candidates = [named]
    listing = native.run_compiler([*compiler, "-print-search-dirs"], "finding libjpeg").stdout
    for line in listing.splitlines():
        if line.startswith("libraries:"):
            candidates += [os.path.join(d, "libjpeg.so") for d in line.split("=", 1)[-1].split(os.pathsep) if d]
    found = next((path for path in candidates if os.path.isabs(path) and os.path.exists(path)), None)
    if found is None:
        raise BuildError("the compiler finds no libjpeg.so; install Debian's libjpeg62-turbo-dev")
    return os.path.realpath(found)


def _libjpeg_flag(compiler: List[str]) -> List[str]:
    return [f'-DEFFNET_LIBJPEG="{_system_libjpeg(compiler)}"']


HELPER = native.Helper("jpeg-region", SOURCE, ("-O2",), ("-ldl",),
                       "libjpeg's headers are in Debian's libjpeg62-turbo-dev", found_flags=_libjpeg_flag)


def _self_check(function: Callable[..., int]) -> None:
    """A rectangle inside a small JPEG, decoded at scales 1 and 2 (columns cropped, rows skipped), must equal
    the same pixels of Pillow's decode (once per process): catches a libjpeg whose build does not match the
    headers (every call would fail, or worse, decode differently)."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    encoded = BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
    data = encoded.getvalue()
    for scale in (1, 2):
        reference = Image.open(BytesIO(data))
        reference.draft("RGB", (96 // scale, 64 // scale))
        left, top, width, height = 40 // scale, 24 // scale, 24 // scale, 16 // scale
        expected = np.asarray(reference.convert("RGB"))[top:top + height, left:left + width]
        decoded = np.empty((height, width, 4), dtype=np.uint8)
        status = function(data, len(data), scale, left, top, width, height, decoded.ctypes.data)
        if status != DECODED or not np.array_equal(decoded[:, :, :3], expected):
            raise BuildError(f"the system libjpeg decodes a test image differently from Pillow (scale 1/{scale}, "
                             f"status {status})")


def _setup(library: ctypes.CDLL) -> ctypes.CDLL:
    library.effnet_open_libjpeg.restype = ctypes.c_char_p
    missing = library.effnet_open_libjpeg()
    if missing is not None:
        raise BuildError(f"cannot use the system libjpeg: {missing.decode(errors='replace')}")
    library.effnet_decode_region.restype = ctypes.c_int
    library.effnet_decode_region.argtypes = (  # data, size, scale, left, top, width, height, out
        ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p)
    _self_check(library.effnet_decode_region)
    return library


@functools.lru_cache(maxsize=1)
def _library() -> Tuple[Optional[ctypes.CDLL], str]:
    """The loaded library, or None and why not (tried once per process; forked workers inherit it)."""
    return HELPER.load(_setup)


def unavailable_reason() -> str:
    """Empty where the region decoder works here, else one line saying why it does not."""
    return _library()[1]


def decode_region(data: bytes, scale: int, rect: Rect) -> Optional[np.ndarray]:
    """``rect`` of the JPEG ``data`` decoded at 1/``scale`` as an RGBX array [H, W, 4] (X = 255) whose RGB equals the
    same region of a full decode; None where this decoder declines: it is not available, or libjpeg raised an error
    or a warning anywhere in the file (the rest of it is entropy-decoded too). The caller then decodes the whole
    file, which fails or warns exactly as Pillow does."""
    library = _library()[0]
    if library is None:
        return None
    left, top, right, bottom = rect
    pixels = np.empty((bottom - top, right - left, 4), dtype=np.uint8)
    status = library.effnet_decode_region(data, len(data), scale, left, top, right - left, bottom - top,
                                          pixels.ctypes.data)
    return pixels if status == DECODED else None
