"""A run is a list of phases: the main training phase and, optionally, the fine-tune phase.

Each phase carries everything that may differ between them (resolution, batch geometry, preprocessing,
optimizer, schedule, regularisation, frozen layers and, on IPUs, its IPU plan), so one loop runs both. The paper's
recipe: train at about half the pixels, average the weights, then fine-tune the last layers briefly at the test
resolution with test-style preprocessing (docs/paper.md, "Reduced-resolution training" and "Fine-tuning at the
test resolution").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

from ipu_options.plan import IpuPhasePlan
from models import native_resolution, train_resolution

from .config import Config, ConfigError, OptimizerConfig, ProgressiveConfig, ScheduleConfig, merged

# The paper's reduced training resolutions (docs/paper.md, "Reduced-resolution training"; B2 is 196, not 192).
HALF_RESOLUTION: Dict[str, int] = {
    "efficientnet-b0": 160, "efficientnet-b1": 176, "efficientnet-b2": 196,
    "efficientnet-b3": 204, "efficientnet-b4": 252, "efficientnet-b5": 328,
}


def half_resolution(model_name: str) -> int:
    """The paper's table, else the size with the native size's remainder mod 32 and closest to half its pixels.

    The rule reproduces the table for B0-B3 and B5 (B4 is a near-tie: 252 and 284 are 0.44x and 0.56x the
    pixels); it gives B6 368 and B7 408.
    """
    if model_name in HALF_RESOLUTION:
        return HALF_RESOLUTION[model_name]
    native = native_resolution(model_name)
    candidates = range(native % 32 or 32, native, 32)
    return min(candidates, key=lambda s: abs(s * s / (native * native) - 0.5))


@dataclass(frozen=True)
class Stage:
    """One slice of a (possibly progressive) phase: from ``first_epoch`` on, these settings hold."""

    first_epoch: int
    resolution: int
    mixup_alpha: float
    dropout: Optional[float]
    randaugment: Optional[float] = None  # None: data.randaugment


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    micro_batch_size: int
    gradient_accumulation: int
    preprocessing: Literal["train", "eval"]
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    stages: Tuple[Stage, ...]
    max_steps: Optional[int] = None
    cutmix_lambda: Optional[float] = None
    first_trainable: Optional[str] = None
    weight_avg_decay: Optional[float] = None
    ema_decay: Optional[float] = None
    val_resolutions: List[int] = field(default_factory=list)
    ipu: Optional[IpuPhasePlan] = None  # train.backend: ipu: the validated IPU plan (train/ipu_plan.py)

    @property
    def resolution(self) -> int:
        """The final (highest) resolution of the phase."""
        return self.stages[-1].resolution

    def stage(self, epoch: int) -> Stage:
        return [s for s in self.stages if s.first_epoch <= epoch][-1]


def training_resolution(cfg: Config) -> int:
    """``train.resolution``: an int, ``half`` (the paper's reduced size), or null: the preset's own training
    size (V1: its evaluation size; V2: smaller, e.g. V2-S 300 for 384)."""
    res = cfg.train.resolution
    if res is None:
        return train_resolution(cfg.model.name)
    return half_resolution(cfg.model.name) if res == "half" else int(res)


def progressive_stages(p: ProgressiveConfig, epochs: int, end_resolution: int) -> Tuple[Stage, ...]:
    """K stages, each ``epochs/K`` long, ramping resolution, mixup, dropout and RandAugment linearly (V2's
    Algorithm 1)."""
    if epochs < p.stages:
        raise ConfigError(f"train.progressive.stages: {p.stages} stages need at least as many epochs, "
                          f"train.epochs is {epochs}")
    stages = []
    for i in range(p.stages):
        t = i / (p.stages - 1)

        def lerp(a: float, b: float, t: float = t) -> float:
            return a + (b - a) * t

        stages.append(Stage(first_epoch=math.floor(i * epochs / p.stages),
                            resolution=int(round(lerp(p.start_resolution, end_resolution))),
                            mixup_alpha=lerp(*p.mixup_alpha), dropout=lerp(*p.dropout),
                            randaugment=lerp(*p.randaugment) if p.randaugment else None))
    return tuple(stages)


def check_training_resolution(cfg: Config, res: int) -> None:
    """Warn (one line) about a training size that is neither a multiple of 32 nor of the preset's own remainder:
    the network halves the image five times (stride 32) with SAME-style padding, so such a size pads some stride-2
    layer's border unevenly and shifts its sampling grid against the sizes the preset is built and tested at."""
    own = train_resolution(cfg.model.name)
    if res % 32 in (0, own % 32):
        return
    nearby = sorted({max(32, res - res % 32), res - res % 32 + 32})
    warnings.warn(f"train.resolution {res} is not a multiple of 32 ({res % 32} over) nor {own % 32} over one like "
                  f"{cfg.model.name}'s own {own} px: the network downsamples by 32 with SAME-style padding, so this "
                  f"size pads some stride-2 layers unevenly; prefer e.g. {' or '.join(map(str, nearby))}",
                  stacklevel=2)


def training_phase(cfg: Config) -> Phase:
    t = cfg.train
    res = training_resolution(cfg)
    check_training_resolution(cfg, res)
    stages = (progressive_stages(t.progressive, t.epochs, res) if t.progressive
              else (Stage(0, res, t.mixup_alpha, None),))
    return Phase(
        name="train", epochs=t.epochs, max_steps=t.max_steps, micro_batch_size=t.micro_batch_size,
        gradient_accumulation=t.gradient_accumulation, preprocessing="train", optimizer=cfg.optimizer,
        schedule=cfg.schedule, stages=stages, cutmix_lambda=t.cutmix_lambda,
        weight_avg_decay=t.weight_avg_decay, ema_decay=t.ema_decay, val_resolutions=t.val_resolutions or [res],
    )


def check_resolution_rule(train_res: int, finetune_res: int, strict: bool) -> None:
    """The paper's ``train % 32 == finetune % 32`` rule (a warning, or an error when strict)."""
    if train_res % 32 == finetune_res % 32:
        return
    message = (f"training resolution {train_res} and fine-tune resolution {finetune_res} differ modulo 32 "
               f"({train_res % 32} vs {finetune_res % 32}). The network downsamples by 32 with SAME-style padding, "
               "so equal remainders keep every stride-2 layer's padding and sampling grid aligned between the two "
               "resolutions; the paper picks sizes that follow this rule.")
    if strict:
        raise ConfigError(f"finetune.resolution: {message} (finetune.strict_resolution is set)")
    warnings.warn(message, stacklevel=2)


def finetune_phase(cfg: Config) -> Phase:
    f, t = cfg.finetune, cfg.train
    res = f.resolution or native_resolution(cfg.model.name)
    check_resolution_rule(training_resolution(cfg), res, f.strict_resolution)
    optimizer = merged(cfg.optimizer, f.optimizer)
    schedule = merged(cfg.schedule, f.schedule)
    return Phase(
        name="finetune", epochs=f.epochs, max_steps=f.max_steps,
        micro_batch_size=f.micro_batch_size or t.micro_batch_size,
        gradient_accumulation=f.gradient_accumulation or t.gradient_accumulation,
        preprocessing=f.preprocessing, optimizer=optimizer, schedule=schedule,
        stages=(Stage(0, res, 0.0, None),), first_trainable=f.first_trainable,
        val_resolutions=sorted({res, *t.val_resolutions}),
    )


def run_phases(cfg: Config) -> List[Phase]:
    phases = [training_phase(cfg)]
    if cfg.finetune.enabled:
        phases.append(finetune_phase(cfg))
    return phases
