"""Command line of the trainer: load and check the recipe, set up distribution, run or resume it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from data import DataError

from .backends import BackendError
from .checkpoint import CheckpointError, find_resumable
from .config import ConfigError, load_config, to_yaml
from .trainer import Interrupted, NonFiniteLoss, Trainer, checkpoint_run_dir, list_run_dirs, resume_state

EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train EfficientNet on CPU, GPU or IPU.")
    parser.add_argument("--config", help="YAML recipe in configs/ (sections as in README); defaults if omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax), e.g. --set model.group_dim=16; repeatable")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue from a checkpoint, or 'auto': the newest loadable checkpoint of this config's "
                             "runs (corrupt ones are skipped)")
    return parser


def init_distributed() -> None:
    """``torchrun`` sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")


def run_guarded(job: Callable[[], None]) -> int:
    """Run ``job``; user mistakes and stops become one clear line on stderr and an exit code, not a traceback."""
    try:
        job()
        return 0
    except (ConfigError, DataError, CheckpointError, BackendError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_config:
        return run_guarded(lambda: print(to_yaml(load_config(args.config, args.overrides)), end=""))
    return run_guarded(lambda: train(args.config, args.overrides, args.resume))


def train(config: Optional[str], overrides: List[str], resume: Optional[str]) -> None:
    cfg = load_config(config, overrides)
    init_distributed()
    state, run_dir = None, None
    if resume:
        path = find_resumable(list_run_dirs(cfg), warn=lambda m: print(m, file=sys.stderr)) \
            if resume == "auto" else Path(resume)
        if path is None:
            print(f"--resume auto: no checkpoint of {cfg.name!r} under {cfg.logging.run_dir}/; starting afresh",
                  file=sys.stderr)
        else:
            state = resume_state(path)
            # The run continues with its saved config; --config replaces it, --set still applies on top.
            cfg = load_config(config, overrides, base=state["config"])
            run_dir = checkpoint_run_dir(path)
            print(f"resuming from {path}", file=sys.stderr)
    only_finetune = state is not None and state.get("phases") == ["finetune"]
    Trainer(cfg, run_dir=run_dir, resume=state, only_finetune=only_finetune).run()
