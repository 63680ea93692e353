"""Atomic checkpoints, the disk checks around them, and finding the one to resume from.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed over the target,
so a crash mid-write leaves the previous checkpoint intact. Before writing, the free space is compared with the
state's size; a full or unwritable disk is a one-line :class:`~train.errors.StorageError` (exit code 2) and the
partial file is removed. Temporary files left by a killed process are removed by :func:`remove_stale_temporaries`
at the next start. Loading uses ``weights_only=True``: checkpoints hold tensors and plain Python data only, so
loading one cannot run code.

Names are ``<phase>-step<N>.pt`` (every N steps, at epoch ends and on a stop), ``<phase>-final.pt`` and, with
``checkpoint.keep_best``, ``<phase>-best.pt`` (never picked to resume from before the others); a run's checkpoints
are ordered by (phase, step) from their names, never by modification time, which ``cp -r`` changes.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Tuple, cast

import torch
from torch import nn

from models.config import stored_model_config

from .errors import StorageError

#: Phases in run order; a checkpoint's phase is the prefix of its file name.
PHASE_ORDER = ("train", "finetune")
#: errno values that mean "this disk or folder cannot take the file", as opposed to a bug.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
#: Room for the pickled metadata and zip records beyond the tensors' bytes.
SIZE_MARGIN_BYTES = 1 << 20
_NAME = re.compile(r"(?P<phase>[a-z]+)-(?:step(?P<step>\d+)|(?P<final>final))\.pt")
_TEMPORARY = re.compile(r"\..+\.pt\..+\.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: about what ``torch.save`` writes."""
    if isinstance(state, torch.Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _storage_error(path: Path, err: OSError, needed: int) -> StorageError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = shutil.disk_usage(path.parent).free
        why = (f"no space left ({_megabytes(free)} free, about {_megabytes(needed)} needed)"
               if err.errno != errno.EDQUOT else f"disk quota exceeded (about {_megabytes(needed)} needed)")
    else:
        why = os.strerror(err.errno) if err.errno else str(err)
    return StorageError(f"cannot write checkpoint {path}: {why}; earlier checkpoints are intact. Free space or "
                        "set logging.run_dir to a writable disk, then resume with --resume auto")


class _RecordingWriter:
    """Passes writes through and remembers the OSError, which ``torch.save`` would otherwise turn into an
    opaque ``RuntimeError`` from its zip writer."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.error: Optional[OSError] = None

    def _record(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as err:
            self.error = err
            raise

    def write(self, data: bytes) -> int:
        return self._record(self.file.write, data)

    def flush(self) -> None:
        self._record(self.file.flush)


def save_checkpoint(state: Dict[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` atomically, or raise :class:`StorageError` with the previous file intact."""
    needed = state_bytes(state) + SIZE_MARGIN_BYTES
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        # Not mkstemp, whose file is owner-only: a checkpoint gets the umask's mode, as every file a run writes.
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        if err.errno in STORAGE_ERRNOS:
            raise _storage_error(path, err, needed) from None
        raise
    writer: Optional[_RecordingWriter] = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(state, cast(IO[bytes], writer))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else err
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            raise _storage_error(path, cause, needed) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint of this tool: {reason}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this tool (no model/config entries)")
    config = state["config"]
    if isinstance(config, dict) and isinstance(config.get("model"), dict):  # maybe written before a key was renamed
        state["config"] = {**config, "model": stored_model_config(config["model"])}
    return state


def load_weights(model: nn.Module, weights: Dict[str, torch.Tensor], source: Path) -> None:
    """``model.load_state_dict(weights)``, or one line saying which tensors do not fit (not torch's 100 lines)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} tensor(s) differ in shape (first: {k} is {list(weights[k].shape)} there, "
                         f"{list(own[k].shape)} here)")
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise CheckpointError(f"checkpoint {source} does not fit this model: {'; '.join(parts)}; the model keys "
                              "must match the ones it was trained with (model.name, width/depth, num_classes, ...)")
    model.load_state_dict(weights)


def step_checkpoint_name(phase: str, step: int) -> str:
    return f"{phase}-step{step:08d}.pt"


def final_checkpoint_name(phase: str) -> str:
    return f"{phase}-final.pt"


def best_checkpoint_name(phase: str) -> str:
    """Where ``checkpoint.keep_best`` keeps a phase's best checkpoint (not a resume candidate before the others)."""
    return f"{phase}-best.pt"


def checkpoint_order(path: Path) -> Tuple[int, float]:
    """(phase index, step) from the file name; a phase's final checkpoint comes after all its steps."""
    match = _NAME.fullmatch(path.name)
    if match is None or match["phase"] not in PHASE_ORDER:
        return (-1, -1.0)
    step = float("inf") if match["final"] else float(match["step"])
    return (PHASE_ORDER.index(match["phase"]), step)


def candidates(run_dirs: List[Path]) -> List[Path]:
    """Checkpoints to resume from, best first: the furthest (phase, step) of any of the runs, so a run started by
    mistake and stopped early never hides one with more progress; between equals, the newer run (run folder names
    end in their start time)."""
    found = [p for run in run_dirs for p in (run / "checkpoints").glob("*.pt")]
    return sorted(found, key=lambda p: (checkpoint_order(p), p.parent.parent.name), reverse=True)


def find_resumable(run_dirs: List[Path], warn: Callable[[str], None] = print) -> Optional[Path]:
    """The best checkpoint that loads; corrupt ones are reported and skipped (``--resume auto``)."""
    for path in candidates(run_dirs):
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            warn(f"warning: {err}; trying the previous one")
            continue
        return path
    return None


def prune(folder: Path, phase: str, keep: int, protect: Optional[Path] = None) -> None:
    """Delete all but the newest ``keep`` step checkpoints of a phase; phase-final checkpoints and ``protect``
    (the newest one known to train, see ``CheckpointLedger`` in train/trainer.py) are kept."""
    steps = sorted(folder.glob(f"{phase}-step*.pt"), key=checkpoint_order, reverse=True)
    for old in steps[keep:]:
        if protect is None or old != protect:
            old.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes that a killed process never finished, saying so on stderr."""
    stale = [p for p in folder.glob(".*.tmp") if _TEMPORARY.fullmatch(p.name)] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
        print(f"removed {path}, left by an interrupted checkpoint write", file=sys.stderr)


NONFINITE_SUFFIX = ".nonfinite"


def set_aside(path: Path) -> Path:
    """Rename a checkpoint whose weights led to a non-finite step, so ``--resume auto`` never picks it but it
    stays for inspection."""
    target = path.with_name(path.name + NONFINITE_SUFFIX)
    os.replace(path, target)
    return target
