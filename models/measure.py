"""What a built model costs: multiply-accumulates and the shapes between stages, measured by running it.

MACs count conv and linear layers only (the convention of the paper's "FLOPs" axis), measured by one forward pass
at the given resolution with hooks, so they are exact for whatever the builder produced.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn


def count_macs(model: nn.Module, resolution: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one image at ``resolution``."""
    total = 0

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, resolution, resolution))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def stage_shapes(model: nn.Module, resolution: int, in_channels: int = 3) -> Dict[str, List[int]]:
    """Output shape (C, H, W) of the stem, every stage and the head for one image."""
    shapes: Dict[str, List[int]] = {}
    modules = dict(model.named_modules())
    stages = [n for n in modules if n.startswith("blocks.") and n.count(".") == 1]
    named = [(n, modules[n]) for n in ["stem", *stages, "head"]]
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, list(out.shape[1:])))
               for n, m in named]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, resolution, resolution))
    finally:
        for h in handles:
            h.remove()
    return shapes
