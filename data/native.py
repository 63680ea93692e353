"""The data path's C helpers (``data/*.c``): built at set-up, only loaded at run time (see docs/data.md, "C helpers").

``python -m data.build_helpers`` (``make native``, which ``make venv``, ``make train`` and ``make test`` run)
compiles each source with the system C compiler (``$CC``, else ``cc``) into ``$XDG_CACHE_HOME/effnet-ipu/<name>/``
(default ``~/.cache``), named by a hash of the source, its fixed flags and the machine type, so a run finds it
without asking a compiler anything. A run only loads (and checks) what is there: no compiler, headers or writable
cache are needed at training time. Where a helper is missing or fails its check, the caller says so in one line
and takes the route through simplejpeg or Pillow, which gives the same pixels. The sources use no Python headers:
one build serves every Python version.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple, TypeVar

COMPILE_TIMEOUT_S = 120
T = TypeVar("T")


class BuildError(RuntimeError):
    """A helper could not be compiled, loaded or checked; the message says what is missing."""


def compiler() -> List[str]:
    """The C compiler command: ``$CC`` (it may carry flags), else ``cc``."""
    return shlex.split(os.environ.get("CC", "").strip() or "cc")


def run_compiler(command: List[str], what: str) -> subprocess.CompletedProcess:
    """``command`` (a compiler call) with a time limit; a missing compiler or a hang is a :class:`BuildError`."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except OSError as err:
        raise BuildError(f"no C compiler ({command[0]}: {err.strerror or err}); install gcc, or set CC") from err
    except subprocess.TimeoutExpired as err:
        raise BuildError(f"{what} took over {COMPILE_TIMEOUT_S} s ({' '.join(command[:3])} ...)") from err


def no_flags_found(command: List[str]) -> List[str]:
    """The default for :attr:`Helper.found_flags`: nothing to look up at set-up."""
    return []


@dataclass(frozen=True)
class Helper:
    """One C source and how it is built: ``flags`` and ``libraries`` are fixed (they name the build);
    ``found_flags(compiler)`` adds what the set-up finds on this host (where libjpeg lives), recorded in the build
    and printed by it. ``missing_hint`` ends the message of a failed compile (what to install)."""

    name: str
    source: Path
    flags: Tuple[str, ...]
    libraries: Tuple[str, ...]
    missing_hint: str
    found_flags: Callable[[List[str]], List[str]] = no_flags_found

    def path(self) -> Path:
        """Where the build lives: computed without a compiler, so a run needs none to find it."""
        recipe = repr((self.flags, self.libraries, platform.machine())).encode()
        key = hashlib.sha256(self.source.read_bytes() + recipe).hexdigest()[:16]
        base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "effnet-ipu" / self.name / f"{self.source.stem}-{key}.so"

    def build(self) -> List[str]:
        """Compile to :meth:`path` (set-up only), atomically, so concurrent set-ups at worst compile it twice;
        readable by every user, like a library. Returns the compile command."""
        target = self.path()
        cc = compiler()
        command = [*cc, "-shared", "-fPIC", *self.flags, *self.found_flags(cc)]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
            os.close(fd)
        except OSError as err:
            raise BuildError(f"cannot write to {target.parent}: {err.strerror or err}") from err
        try:
            result = run_compiler([*command, "-o", partial, str(self.source), *self.libraries],
                                  f"compiling {self.source.name}")
            if result.returncode != 0:
                first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
                raise BuildError(f"compiling {self.source.name} failed ({first.strip()[:200]}); {self.missing_hint}")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(partial, 0o755 & ~umask)  # mkstemp made it private
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return command

    def load(self, setup: Callable[[ctypes.CDLL], T]) -> Tuple[T | None, str]:
        """``setup`` (declare the functions, check the results) applied to the built library, or None and one
        line saying why not. Never compiles."""
        target = self.path()
        if not target.exists():
            return None, (f"{self.source.name} is not built for this source and machine ({target} is missing; "
                          "make native builds it)")
        try:
            return setup(ctypes.CDLL(str(target))), ""
        except (BuildError, OSError) as err:
            return None, f"{target.name} does not work here: {err}"

