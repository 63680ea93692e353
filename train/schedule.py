"""Learning rate as a pure function of the optimizer step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

from .config import ScheduleConfig


def lr_at(step: int, steps_per_epoch: int, total_steps: int, peak: float, cfg: ScheduleConfig) -> float:
    """Linear warm-up to ``peak``, then exponential (x decay_rate every decay_epochs), cosine or constant."""
    epoch = step / steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if cfg.name == "exponential":
        return peak * cfg.decay_rate ** math.floor(epoch / cfg.decay_epochs) if cfg.decay_epochs else peak
    if cfg.name == "cosine":
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak
