"""Decoding only a JPEG's crop: ``jpeg_region.c`` built on first use and called through ctypes (see docs/data.md,
"Decoding only the crop").

The shared object is compiled with the system C compiler (``$CC``, else ``cc``) against the system libjpeg's
headers (Debian: ``gcc`` and ``libjpeg62-turbo-dev``) into ``$XDG_CACHE_HOME/effnet-ipu/jpeg-region/`` (default
``~/.cache``), named by a hash of the source, the compiler and the libjpeg it opens, so every later process,
data-loader workers included, only loads it. Loading checks it on a small image against Pillow. Where it cannot
be built or checked, :func:`unavailable_reason` says why and the fused decode uses a full-frame decoder instead
(``data.jpeg_decoder: auto``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image

SOURCE = Path(__file__).with_name("jpeg_region.c")
COMPILE_TIMEOUT_S = 120
DECODED = 0  # what effnet_decode_region returns on success (1: libjpeg error, 2: warning, 3: bad request)

Rect = Tuple[int, int, int, int]  # left, top, right, bottom in decoded pixels


class BuildError(RuntimeError):
    """The decoder could not be compiled or loaded; the message says what is missing."""


def _compiler() -> List[str]:
    return shlex.split(os.environ.get("CC", "").strip() or "cc")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "effnet-ipu" / "jpeg-region"


def _run(command: List[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except OSError as err:
        raise BuildError(f"no C compiler ({command[0]}: {err.strerror or err}); install gcc, or set CC") from err
    except subprocess.TimeoutExpired as err:
        raise BuildError(f"{what} took over {COMPILE_TIMEOUT_S} s ({' '.join(command[:3])} ...)") from err


def _system_libjpeg(compiler: List[str]) -> str:
    """The libjpeg the compiler links against, as a real path (the shared object opens it by this path)."""
    path = _run([*compiler, "-print-file-name=libjpeg.so"], "finding libjpeg").stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise BuildError("the compiler finds no libjpeg.so; install Debian's libjpeg62-turbo-dev")
    return os.path.realpath(path)


def _build(rebuild: bool = False) -> Path:
    """The shared object for this source, compiler and libjpeg: compiled unless already cached (or ``rebuild``),
    atomically, so concurrent processes at worst compile it twice; readable by every user, like a library."""
    compiler = _compiler()
    command = [*compiler, "-O2", "-shared", "-fPIC", f'-DEFFNET_LIBJPEG="{_system_libjpeg(compiler)}"']
    key = hashlib.sha256(SOURCE.read_bytes() + repr((command, platform.machine())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"jpeg_region-{key}.so"
    if target.exists() and not rebuild:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
    except OSError as err:
        raise BuildError(f"cannot write to {target.parent}: {err.strerror or err}") from err
    try:
        result = _run([*command, "-o", partial, str(SOURCE), "-ldl"], f"compiling {SOURCE.name}")
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise BuildError(f"compiling {SOURCE.name} failed ({first.strip()[:200]}); libjpeg's headers are in "
                             "Debian's libjpeg62-turbo-dev")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o755 & ~umask)  # mkstemp made it private
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


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


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
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
    """The loaded library, or None and why not (tried once per process; forked workers inherit it). A cached
    build that does not load (made on another host, say) is rebuilt once."""
    try:
        try:
            return _load(_build()), ""
        except OSError:
            return _load(_build(rebuild=True)), ""
    except (BuildError, OSError) as err:
        return None, str(err)


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
