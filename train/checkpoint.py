"""Atomic checkpoints and finding the one to resume from.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed over the target,
so a crash mid-write leaves the previous checkpoint intact. Loading uses ``weights_only=True``: checkpoints hold
tensors and plain Python data only, so loading one cannot run code.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


def save_checkpoint(state: Dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint of this tool: {err}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this tool (no model/config entries)")
    return state


def step_checkpoint_name(phase: str, step: int) -> str:
    return f"{phase}-step{step:08d}.pt"


def _order(path: Path) -> tuple:
    match = re.search(r"step(\d+)", path.name)
    return (path.stat().st_mtime, int(match.group(1)) if match else -1)


def candidates(run_dirs: List[Path]) -> List[Path]:
    """Checkpoints under the given run folders, newest first."""
    found = [p for d in run_dirs for p in (d / "checkpoints").glob("*.pt")]
    return sorted(found, key=_order, reverse=True)


def find_resumable(run_dirs: List[Path], warn=print) -> Optional[Path]:
    """The newest checkpoint that loads; corrupt ones are reported and skipped (``--resume auto``)."""
    for path in candidates(run_dirs):
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            warn(f"warning: {err}; trying the previous one")
            continue
        return path
    return None


def prune(folder: Path, phase: str, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints of a phase (phase-final checkpoints are kept)."""
    steps = sorted(folder.glob(f"{phase}-step*.pt"), key=_order, reverse=True)
    for old in steps[keep:]:
        old.unlink(missing_ok=True)
