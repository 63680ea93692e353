"""A count of skipped corrupt samples that every process holding a copy of the data set adds to."""

from __future__ import annotations

import os
import tempfile
import uuid
import weakref
from typing import Any, Dict


def _remove_if_owner(path: str, owner_pid: int) -> None:
    # Forked workers inherit the finalizer; only the creating process may delete the shared file.
    if os.getpid() == owner_pid:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class SkipCounter:
    """Counts skips across DataLoader workers, however the data set reached them.

    Why a file and not ``multiprocessing.Value``: a Value can only be shared by process inheritance, but
    datasets also travel by plain pickling (spawn/forkserver workers, and PopTorch's
    ``AsynchronousDataAccessor``, which pickles the whole loader to a file). A path survives any of these.
    Each skip appends one byte with ``O_APPEND``, which the kernel applies atomically, so the count is the
    file's size and no lock is needed. The file exists only once something was skipped and is removed when
    the creating process drops the counter.
    """

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"effnet-ipu-skipped-{os.getpid()}-{uuid.uuid4().hex}")
        self._finalizer = weakref.finalize(self, _remove_if_owner, self.path, os.getpid())

    def increment(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)

    @property
    def value(self) -> int:
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def __getstate__(self) -> Dict[str, Any]:
        # Copies in other processes share the count but never delete the file.
        return {"path": self.path}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.path = state["path"]
