"""Parameters, multiply-accumulates and split points of a model: ``python -m models.summary --help``.

MACs count conv and linear layers only (the convention of the paper's "FLOPs" axis), measured by running one
forward pass at the given resolution with hooks, so they are exact for whatever the builder produced.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, get_args

import torch
from torch import nn

from . import ModelConfig, build_model, native_resolution, split_points
from .config import ModelName


def count_macs(model: nn.Module, resolution: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one image at ``resolution``."""
    total = 0

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * k
        else:
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
    named = [("stem", model.stem)] + [(f"blocks.{i}", s) for i, s in enumerate(model.blocks)] + [("head", model.head)]
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


def summarize(cfg: ModelConfig, resolution: int) -> Dict:
    model = build_model(cfg)
    return {
        "model": cfg.name,
        "resolution": resolution,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, resolution, cfg.in_channels),
        "stage_shapes": stage_shapes(model, resolution, cfg.in_channels),
        "split_points": split_points(model),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-b0", choices=get_args(ModelName))
    parser.add_argument("--group-dim", type=int, default=1, help="channels per group of the MBConv kxk convs (16 = G16)")
    parser.add_argument("--expand-ratio", type=int, default=None, help="expansion of the expanding MBConv stages (G16 recipe: 4)")
    parser.add_argument("--norm", choices=["batch", "group", "layer"], default="batch")
    parser.add_argument("--num-groups", type=int, default=4)
    parser.add_argument("--proxy-norm", action="store_true")
    parser.add_argument("--resolution", type=int, default=None, help="default: the preset's native (evaluation) resolution")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    from train.config import ConfigError, check_section  # the config checker gives the same messages as YAML

    try:
        cfg = check_section(ModelConfig, {
            "name": args.model, "group_dim": args.group_dim, "expand_ratio": args.expand_ratio, "norm": args.norm,
            "num_groups": args.num_groups, "proxy_norm": args.proxy_norm, "num_classes": args.num_classes,
        }, "model")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resolution = args.resolution or native_resolution(cfg.name)
    print(json.dumps(summarize(cfg, resolution)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
