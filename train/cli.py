"""Command line of the trainer: load and check the recipe, then run it (or just print it)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import ConfigError, load_config, to_yaml


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train EfficientNet on CPU, GPU or IPU.")
    parser.add_argument("--config", help="YAML recipe in configs/ (sections as in README); defaults if omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax), e.g. --set model.group_dim=16; repeatable")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    print("training is not implemented yet", file=sys.stderr)
    return 1
