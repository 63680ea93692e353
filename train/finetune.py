"""``python -m train.finetune``: only the fine-tune phase, starting from any checkpoint's (averaged) weights.

Only the last layers are trained at the test resolution, on test-style (resize + centre crop) images, which
removes the train/test object-size discrepancy of random-resized crops (FixRes) at a fraction of the cost; the
layers before ``finetune.first_trainable`` are frozen (:func:`models.splits.freeze_before`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .checkpoint import load_checkpoint
from .cli import init_distributed, run_guarded
from .config import load_config
from .run_plan import check_data, launch_world_size, plan_launch
from .trainer import Trainer, start_weights


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.finetune",
        description="Run only the fine-tune phase, starting from a checkpoint's (averaged) weights.")
    parser.add_argument("--checkpoint", required=True, help="any checkpoint of this tool")
    parser.add_argument("--config", help="recipe to use instead of the checkpoint's own config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set finetune.resolution=224")
    args = parser.parse_args(argv)
    return run_guarded(lambda: finetune(Path(args.checkpoint), args.config, args.overrides))


def finetune(checkpoint: Path, config: Optional[str], overrides: List[str]) -> None:
    state = load_checkpoint(checkpoint)
    cfg = load_config(config, overrides, base=state["config"])
    plan = plan_launch(cfg, only_finetune=True)
    datasets = check_data(plan, launch_world_size())
    init_distributed()
    Trainer(plan, datasets, start_from=start_weights(state), start_from_path=checkpoint).run()


if __name__ == "__main__":
    sys.exit(main())
