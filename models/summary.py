"""``python -m models.summary``: parameters, multiply-accumulates, stage shapes and split points of a model, as
one JSON object (MACs as in :mod:`models.measure`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, get_args

from . import ModelConfig, build_model, native_resolution, split_points
from .config import ModelName
from .measure import count_macs, stage_shapes


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


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below the minimum 1")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-b0", choices=get_args(ModelName))
    parser.add_argument("--group-dim", type=positive_int, default=1,
                        help="channels per group of the MBConv kxk convs (16 = G16)")
    parser.add_argument("--expand-ratio", type=positive_int, default=None,
                        help="expansion of the expanding MBConv stages (G16 recipe: 4)")
    parser.add_argument("--norm", choices=["batch", "group", "layer"], default="batch")
    parser.add_argument("--num-groups", type=positive_int, default=4)
    parser.add_argument("--proxy-norm", action="store_true")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="default: the preset's native (evaluation) resolution")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    args = parser.parse_args(argv)
    cfg = ModelConfig(name=args.model, group_dim=args.group_dim, expand_ratio=args.expand_ratio, norm=args.norm,
                      num_groups=args.num_groups, proxy_norm=args.proxy_norm, num_classes=args.num_classes)
    try:
        cfg.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resolution = args.resolution or native_resolution(cfg.name)
    print(json.dumps(summarize(cfg, resolution)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
