"""The stop protocol: a SIGINT/SIGTERM reaching any process ends the job cleanly on every process.

1. A signal only sets a flag (:class:`StopSignals`); nothing is interrupted mid-step. Loader workers ignore the
   signals altogether (:mod:`data.worker_signals`), so a signal to the whole process group — what ``timeout``,
   Slurm and most schedulers send — cannot kill a worker under the main process.
2. After every host call (and every validation batch) the processes agree on the flag with one tiny all-reduce
   (``Backend.any_process``), so a signal that reached one rank — or one rank's main process only — stops all of
   them at the same step boundary.
3. Every process then takes part in writing one interrupt checkpoint (rank 0 writes it, the others wait for it),
   names it, and exits with code 130. The bound is one host call (one optimizer step on torch, ``device
   iterations`` steps on IPUs) or one validation batch, plus the checkpoint write.

Signals after the first are counted but change nothing: the stop is already on its way and interrupting the
checkpoint write would lose it; they stay caught until the process exits. SIGKILL cannot be caught: a killed rank
ends the job through the launcher (torchrun, poprun), and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType
from typing import Any, Dict, Optional, Type

from data.worker_signals import STOP_SIGNALS

from .errors import Interrupted


class StopSignals:
    """Turns SIGINT/SIGTERM into a request the loop honours at the next step boundary."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.count = 0
        self._previous: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """``SIGTERM``, or ``a signal on another process`` when this one received none."""
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another process"

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        # No printing here: the handler may run while the main thread is inside a write to stderr.
        self.count += 1
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        """Restore the previous handlers, except after a stop (a signal here, or the job's agreed stop leaving as
        :class:`Interrupted`, which is how a rank that got no signal itself stops): the process is on its way
        out, and a launcher's follow-up signal (torchrun signals the remaining ranks as soon as one exits) must
        not turn its exit code 130 into death by signal while it cleans up. So the stop signals are then ignored
        (SIG_IGN) until the process ends: Python's shutdown resets a Python-level handler to the default action
        before the interpreter is torn down, but leaves SIG_IGN in place."""
        stopping = self.requested or (exc_type is not None and issubclass(exc_type, Interrupted))
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
        self._previous.clear()
