"""Loader workers never act on the job's stop signals; the main process alone turns them into a clean stop.

Schedulers (Slurm, ``timeout``, Kubernetes) signal the whole process group, so SIGINT/SIGTERM reach every
DataLoader worker as well. PyTorch's worker signal handler exits on a SIGTERM from anyone but its parent, and the
main process then fails with "DataLoader worker (pid N) is killed by signal" in the middle of whatever it was
doing — a crash instead of the checkpoint the stop was meant to write. So workers ignore both signals (their
parent shuts them down through the loader as usual, and a worker whose parent died exits on its own).

Ignoring SIGTERM has one cost: at interpreter exit, ``multiprocessing`` ends daemonic children (loader workers
are daemonic) with SIGTERM and then waits for them, which would wait forever for a worker left running by an
exception. So an exit hook, run before multiprocessing's, kills the daemonic children that are still alive
(after resetting PyTorch's SIGCHLD handler, which would otherwise report each one as a crashed worker).

There is a window between a worker's fork and its ``worker_init_fn`` where the inherited handlers still act.
:func:`stop_signals_deferred` closes it: the parent blocks the signals while it creates loaders and iterators, so
workers are born with them blocked and unblock them only once they ignore them; a signal that arrives meanwhile
stays pending for the parent and is handled as soon as the block ends.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # its exit hook is registered on import; ours, registered below, runs before it
import signal
import threading
from typing import Iterator

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def ignore_stop_signals() -> None:
    """In a worker process: ignore SIGINT/SIGTERM from now on, then accept signals again."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """In the main process, around creating loaders or their iterators (which fork workers)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread forks workers and runs Python signal handlers
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _kill_daemonic_children() -> None:
    daemonic = [child for child in multiprocessing.active_children() if child.daemon]
    if daemonic and threading.current_thread() is threading.main_thread():
        # PyTorch's SIGCHLD handler would report each killed worker as a failure; at exit that is expected.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in daemonic:
        child.kill()


atexit.register(_kill_daemonic_children)
