"""The data path's C helpers (``data/*.c``): compiled on first use and loaded through ctypes (see docs/data.md,
"C helpers").

Each source is compiled with the system C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/effnet-ipu/<name>/`` (default ``~/.cache``), named by a hash of the source, the compile and link
command and the machine type, so every later process only loads it. The sources use
no Python headers: one build serves every Python version. Where a helper cannot be built or fails its check, the
caller says why (one line) and takes the route through simplejpeg or Pillow, which gives the same pixels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, List, Sequence, Tuple, TypeVar

COMPILE_TIMEOUT_S = 120
T = TypeVar("T")


class BuildError(RuntimeError):
    """A helper could not be compiled, loaded or checked; the message says what is missing."""


def compiler() -> List[str]:
    """The C compiler command: ``$CC`` (it may carry flags), else ``cc``."""
    return shlex.split(os.environ.get("CC", "").strip() or "cc")


def _cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "effnet-ipu" / name


def run_compiler(command: List[str], what: str) -> subprocess.CompletedProcess:
    """``command`` (a compiler call) with a time limit; a missing compiler or a hang is a :class:`BuildError`."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except OSError as err:
        raise BuildError(f"no C compiler ({command[0]}: {err.strerror or err}); install gcc, or set CC") from err
    except subprocess.TimeoutExpired as err:
        raise BuildError(f"{what} took over {COMPILE_TIMEOUT_S} s ({' '.join(command[:3])} ...)") from err


def build(source: Path, name: str, flags: Sequence[str], libraries: Sequence[str], missing_hint: str,
          rebuild: bool = False) -> Path:
    """The shared object for ``source`` and this compiler and ``flags``: compiled unless already cached (or
    ``rebuild``), atomically, so concurrent processes at worst compile it twice; readable by every user, like a
    library. ``missing_hint`` ends the message of a failed compile (what to install)."""
    command = [*compiler(), "-shared", "-fPIC", *flags]
    recipe = repr((command, list(libraries), platform.machine())).encode()
    key = hashlib.sha256(source.read_bytes() + recipe).hexdigest()[:16]
    target = _cache_dir(name) / f"{source.stem}-{key}.so"
    if target.exists() and not rebuild:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
    except OSError as err:
        raise BuildError(f"cannot write to {target.parent}: {err.strerror or err}") from err
    try:
        result = run_compiler([*command, "-o", partial, str(source), *libraries], f"compiling {source.name}")
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise BuildError(f"compiling {source.name} failed ({first.strip()[:200]}); {missing_hint}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o755 & ~umask)  # mkstemp made it private
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load(make: Callable[[bool], Path], setup: Callable[[ctypes.CDLL], T]) -> Tuple[T | None, str]:
    """``setup`` (declare the functions, check the results) applied to the library ``make(rebuild)`` builds, or
    None and one line saying why not. A cached build that does not load (made on another host, say) is rebuilt
    once."""
    try:
        try:
            return setup(ctypes.CDLL(str(make(False)))), ""
        except OSError:
            return setup(ctypes.CDLL(str(make(True)))), ""
    except (BuildError, OSError) as err:
        return None, str(err)
