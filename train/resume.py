"""Resuming a run honestly: which checkpoint, and refusing a config that would compute something else.

A checkpoint's position (phase, epoch, host call, step) only means the same thing under the same model, batch
geometry, data, seed and schedule: resumed with ``train.micro_batch_size`` halved, "call 7 of 40" would restart at
sample 56 instead of 112. So a resumed run compares its config with the checkpoint's and refuses (one line naming
the keys) any change outside :data:`MAY_CHANGE` — where data and outputs live, how fast the run goes, what it
logs — unless ``--resume-force``, which says what it overrides. Turning W&B off while the run has a W&B run would
silently end that run's history, so it is refused too.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Dict, List, Tuple

from .config import Config, ConfigError, config_to_dict

#: Keys a resumed run may change: they do not change what it computes (patterns as in fnmatch).
MAY_CHANGE = (
    "name", "data.path", "data.workers", "data.prefetch_factor", "data.pin_memory", "data.persistent_workers",
    "data.jpeg_decoder", "data.skip_corrupt", "model.norm_impl",
    "train.device", "train.channels_last", "train.compile", "train.compile_mode",
    "train.validate_every", "train.val_resolutions", "train.val_batch_size", "logging.*", "checkpoint.*",
    # IPU placement, memory and compiler settings; replicas and device iterations change the batch geometry.
    "ipu.*",
)
MUST_MATCH_IPU = ("ipu.replicas", "ipu.device_iterations", "ipu.finetune.replicas", "ipu.finetune.device_iterations")

Change = Tuple[str, Any, Any]


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: Dict[str, Any], cfg: Config) -> List[Change]:
    """``(key, checkpoint value, new value)`` for every leaf key that differs."""
    old, new = _flatten(saved), _flatten(config_to_dict(cfg))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _may_change(key: str) -> bool:
    if key in MUST_MATCH_IPU:
        return False
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_CHANGE)


def check_resume(state: Dict[str, Any], cfg: Config, world_size: int, force: bool,
                 note: Callable[[str], None]) -> None:
    """Refuse (ConfigError) a resumed config that computes something else, unless ``force``; ``note`` gets one
    line per override accepted by ``force``."""
    path = state.get("path", "the checkpoint")
    changes = [c for c in config_changes(state["config"], cfg) if not _may_change(c[0])]
    saved_world = state.get("world_size")
    # torch: processes shard the data and make the global batch; on IPUs ipu.replicas (compared above) does.
    if cfg.train.backend == "torch" and saved_world is not None and saved_world != world_size:
        changes.append(("processes (torchrun --nproc_per_node x nodes)", saved_world, world_size))
    if state.get("wandb_id") and cfg.logging.wandb == "disabled":
        changes.append(("logging.wandb (the run has W&B run id " + str(state["wandb_id"]) + ")",
                        state["config"].get("logging", {}).get("wandb"), "disabled"))
    if not changes:
        return
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
    if not force:
        raise ConfigError(f"--resume {path}: the config changes what the run computes ({listed}); resumed so, it "
                          "would not continue the same run. Undo the change, start a new run, or pass "
                          "--resume-force to continue anyway")
    for key, old, new in changes:
        note(f"--resume-force: continuing {path} with {key}: {old!r} -> {new!r}")
