"""What this host offers the input pipeline: usable cores, training processes, and so the default worker count."""

from __future__ import annotations

import os
from typing import Optional

# Environment variables that say how many ranks share this host: torchrun's, then Open MPI's (poprun runs on it).
LOCAL_RANKS_ENV = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which schedulers and containers set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_ranks() -> int:
    """Training processes on this host, from the launcher's environment (1 without a launcher)."""
    for name in LOCAL_RANKS_ENV:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_workers(ranks: Optional[int] = None) -> int:
    """``data.workers: null``: this rank's share of the host's usable cores, less one for the rank itself (which
    runs the training loop and collects the batches); 0 (load in the main process) on a single core."""
    return max(usable_cores() // (ranks or local_ranks()) - 1, 0)
