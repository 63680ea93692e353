"""Split points: the names pipeline stages start at and fine-tuning freezes before, without building a model.

Names, in execution order: ``stem``, ``blocks.<stage>.<index>`` (0-based, as in timm), ``head``, ``classifier``.
They are module names of :class:`models.efficientnet.EfficientNet`, so ``dict(model.named_modules())[name]`` is the
module; :func:`models.efficientnet.split_points` of a built model gives the same list (a test checks it).
"""

from __future__ import annotations

from typing import List

from torch import nn

from .config import ModelConfig
from .efficientnet import block_plan, split_points


def split_point_names(cfg: ModelConfig) -> List[str]:
    """The split points of the model ``cfg`` describes, from its block plan alone (cheap even for B7)."""
    names = ["stem"]
    for s, stage in enumerate(block_plan(cfg)):
        names += [f"blocks.{s}.{i}" for i in range(len(stage))]
    return names + ["head", "classifier"]


def freeze_before(model: nn.Module, first_trainable: str) -> List[nn.Module]:
    """Stop gradients for every split point before ``first_trainable``; returns the frozen modules.

    The caller keeps the frozen modules in eval mode, so their dropout, stochastic depth and BatchNorm
    statistics stay fixed as well. ``first_trainable`` is checked against the config beforehand
    (train/run_plan.py); here an unknown name is a programming error.
    """
    names = split_points(model)
    if first_trainable not in names:
        raise ValueError(f"{first_trainable!r} is not a split point of this model; valid names: {', '.join(names)}")
    modules = dict(model.named_modules())
    frozen = [modules[n] for n in names[:names.index(first_trainable)]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen
