"""Fine-tuning: freezing everything before a split point, and ``python -m train.finetune`` from any checkpoint.

Only the last layers are trained at the test resolution, on test-style (resize + centre crop) images, which
removes the train/test object-size discrepancy of random-resized crops (FixRes) at a fraction of the cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from torch import nn

from models import split_points

from .config import ConfigError


def freeze_before(model: nn.Module, first_trainable: str) -> List[nn.Module]:
    """Stop gradients for every split point before ``first_trainable``; returns the frozen modules.

    The caller keeps the frozen modules in eval mode, so their dropout, stochastic depth and BatchNorm
    statistics stay fixed as well.
    """
    names = split_points(model)
    if first_trainable not in names:
        raise ConfigError(f"finetune.first_trainable: {first_trainable!r} is not a split point of this model; "
                          f"valid names: {', '.join(names)}")
    modules = dict(model.named_modules())
    frozen = [modules[n] for n in names[:names.index(first_trainable)]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.finetune",
        description="Run only the fine-tune phase, starting from a checkpoint's (averaged) weights.")
    parser.add_argument("--checkpoint", required=True, help="any checkpoint of this tool")
    parser.add_argument("--config", help="recipe to use instead of the checkpoint's own config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set finetune.resolution=224")
    args = parser.parse_args(argv)
    from .cli import run_guarded

    return run_guarded(lambda: _finetune(Path(args.checkpoint), args.config, args.overrides))


def _finetune(checkpoint: Path, config: Optional[str], overrides: List[str]) -> None:
    from .checkpoint import load_checkpoint
    from .cli import init_distributed
    from .config import load_config
    from .run_plan import check_data, launch_world_size, plan_run
    from .trainer import Trainer, start_weights

    state = load_checkpoint(checkpoint)
    cfg = load_config(config, overrides, base=state["config"])
    plan = plan_run(cfg, only_finetune=True)
    datasets = check_data(plan, launch_world_size())
    init_distributed()
    Trainer(plan, datasets, start_from=start_weights(state), start_from_path=checkpoint).run()


if __name__ == "__main__":
    sys.exit(main())
