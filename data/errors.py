"""The one exception type of the data pipeline."""

from __future__ import annotations

_WORKER_PREFIX = "Caught DataError in DataLoader worker process"


class DataError(ValueError):
    """A data set, file or setting the user must fix; the CLI prints it without a traceback.

    Every message names the offending path, member, key or value, so the user can act on it alone.

    A DataLoader worker's exception reaches the main process re-raised as the same type, with the worker's whole
    traceback as its message; ``str()`` gives back the original one line, saying which worker it came from.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if not text.startswith(_WORKER_PREFIX):
            return text
        where = text.splitlines()[0][len("Caught DataError in "):].rstrip(".")
        last = [line for line in text.splitlines() if line.strip()][-1]
        return f"{last.split('DataError: ', 1)[-1]} (in {where})"
