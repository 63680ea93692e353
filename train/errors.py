"""How a run can end other than by finishing, and the exit code each way means (README, "Exit codes").

Every user-facing error is one line naming the file, key or value at fault; :func:`train.cli.run_guarded` maps the
exception types to exit codes, so no other module decides them.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # a config, data set, checkpoint or run folder the user must fix
EXIT_NONFINITE = 3  # the loss or gradients became NaN/inf
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: an interrupt checkpoint was written; resume with --resume


class StorageError(RuntimeError):
    """The run folder cannot be written (full disk, quota, read-only or permissions); names the path."""


class NonFiniteLoss(RuntimeError):
    """The loss or gradients became NaN/inf; the message names the step and the last checkpoint that trains."""


class Interrupted(RuntimeError):
    """A stop signal arrived; every process saved (or agreed on) one interrupt checkpoint."""
