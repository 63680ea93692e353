"""Command line of the trainer: load and check the recipe, set up distribution, run or resume it.

Order matters for a job of many processes: everything that can be wrong with the config, the resume and the data
is checked before the process group starts, so a mistake is one line on every process and never a hang.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from data import DataError
from data.decode import choose_decoders
from data.resample import in_use as resize_in_use
from ipu_options.plan import PlanError

from .backends import BackendError
from .checkpoint import CheckpointError, final_checkpoint_name, find_resumable, remove_stale_temporaries
from .config import Config, ConfigError, load_config, to_yaml
from .config_docs import key_docs, render_markdown, render_text
from .errors import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_USER_ERROR, Interrupted, NonFiniteLoss, StorageError
from .resume import check_resume
from .run_plan import RunPlan, check_data, launch_world_size, plan_launch, plan_run
from .trainer import Trainer, checkpoint_run_dir, list_run_dirs, resume_state

#: Exceptions that are the user's to fix: one line on stderr, exit code 2, no traceback.
USER_ERRORS = (ConfigError, PlanError, DataError, CheckpointError, BackendError, StorageError)


#: Shortcuts that timm and torchvision users type: flag -> (config key, type, metavar, help). docs/runs.md.
SHORTCUTS: Dict[str, Tuple[str, Callable[[str], Any], str, str]] = {
    "--data": ("data.path", str, "PATH", "the data (a folder, a .tar/.tar.gz or a shard folder); data.dataset "
                                         "becomes auto, which reads the kind from the path"),
    "--epochs": ("train.epochs", int, "N", "training epochs"),
    "--batch-size": ("train.micro_batch_size", int, "N", "images per process and step (micro-batch)"),
    "--lr": ("optimizer.lr", float, "LR", "learning rate at optimizer.reference_batch images (scaled to the "
                                          "global batch)"),
    "--output": ("logging.run_dir", str, "DIR", "where run folders go"),
    "--workers": ("data.workers", int, "N", "data loading processes per process"),
    "--resolution": ("train.resolution", lambda text: int(text) if text.isdigit() else text, "PX|half",
                     "training resolution"),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def shortcut_overrides(args: argparse.Namespace) -> List[str]:
    """The ``--set`` items the shortcuts stand for, followed by the user's own ``--set`` items; a key given both
    ways is a one-line error (which should win is not obvious). ``--amp`` depends on the device, so it is decided
    from the recipe with the other overrides applied."""
    given = {key: getattr(args, _dest(flag)) for flag, (key, *_) in SHORTCUTS.items()
             if getattr(args, _dest(flag)) is not None}
    items = [f"{key}={json.dumps(value) if isinstance(value, str) else value}" for key, value in given.items()]
    explicit = {item.partition("=")[0].strip() for item in args.overrides}
    for item in items:
        key = item.partition("=")[0]
        if key in explicit:
            flag = next(f for f, (k, *_) in SHORTCUTS.items() if k == key)
            raise ConfigError(f"{flag} and --set {key} both set {key}; keep one")
    if args.data is not None and "data.dataset" not in explicit:  # the recipe's kind was for its own path
        items.append("data.dataset=auto")
    if args.amp:
        if "precision.compute" in explicit:
            raise ConfigError("--amp and --set precision.compute both set precision.compute; keep one")
        cfg = load_config(args.config, items + args.overrides)
        items.append(f"precision.compute={amp_precision(cfg)}")
    return items + args.overrides


def amp_precision(cfg: Config) -> str:
    """The 16-bit compute ``--amp`` means on the run's device: IPUs 16.16; a GPU bf16 where it has it, else fp16;
    a CPU bf16 (its autocast has no fp16)."""
    if cfg.train.backend == "ipu":
        return "16.16"
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", description="Train EfficientNet on CPU, GPU or IPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (type = default [allowed]; set in a recipe or with --set):\n" + render_text(key_docs()))
    parser.add_argument("--config", help="YAML recipe in configs/ (sections as in README); defaults if omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax), e.g. --set model.group_dim=16; repeatable")
    parser.add_argument("--help-config", nargs="?", const="text", choices=["text", "markdown"],
                        help="print every config key with its type, default, allowed values and help and exit "
                             "(markdown: the table of docs/config.md)")
    parser.add_argument("--print-config", action="store_true",
                        help="check the recipe, print it fully resolved (and what it resolves to) and exit")
    shortcuts = parser.add_argument_group(
        "shortcuts", "each sets one config key, as --set would (a key set both ways is an error)")
    for flag, (key, kind, meta, help_text) in SHORTCUTS.items():
        shortcuts.add_argument(flag, dest=_dest(flag), type=kind, metavar=meta, help=f"{key}: {help_text}")
    shortcuts.add_argument("--amp", action="store_true",
                           help="precision.compute: bf16 autocast (fp16 on a GPU without bf16; 16.16 on IPUs)")
    parser.add_argument("--check", action="store_true",
                        help="run every check made before the first step (config, phases, resume, data: both "
                             "splits open and their first batch decodes), print the run's plan and exit 0, or "
                             "the one-line error")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue from a checkpoint, or 'auto': the furthest loadable checkpoint of this "
                             "config's runs (corrupt ones are skipped); a finished run exits 0")
    parser.add_argument("--resume-force", action="store_true",
                        help="resume even though the config changes what the run computes (model, batch geometry, "
                             "data, seed, schedule, number of processes); each change is listed")
    return parser


def init_distributed() -> None:
    """``torchrun`` sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")


def one_line_warning(message: Any, category: Any, filename: str, lineno: int, line: Optional[str] = None) -> str:
    """``warning: <message>``: the project's warnings are addressed to the user, who needs neither the file and
    line that raised them nor the echoed source line of Python's default format."""
    return f"warning: {message}\n"


def run_guarded(job: Callable[[], None]) -> int:
    """Run ``job``; user mistakes and stops become one clear line on stderr and an exit code, not a traceback.
    Unexpected internal errors keep their traceback; warnings print as one line each."""
    default_format = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        job()
        return 0
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (set-up, export, predict, validate)
        print("interrupted: stopped before finishing", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = default_format
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        docs = key_docs()
        print(render_markdown(docs) if args.help_config == "markdown" else render_text(docs), end="")
        return 0
    def job() -> None:
        overrides = shortcut_overrides(args)
        if args.print_config:
            print_config(args.config, overrides)
        elif args.check:
            train(args.config, overrides, args.resume, args.resume_force, check_only=True)
        else:
            train(args.config, overrides, args.resume, args.resume_force)

    return run_guarded(job)


def describe_plan(plan: RunPlan, world_size: int) -> List[str]:
    """What the recipe resolves to (``half`` -> 160, batch geometry, validation sizes), one line per phase."""
    lines = []
    for index, phase in enumerate(plan.phases):
        per_call = plan.samples_per_call(index, world_size)
        frozen = f", trainable from {phase.first_trainable}" if phase.first_trainable else ""
        sizes = " -> ".join(str(s.resolution) for s in phase.stages)
        lines.append(f"phase {phase.name}: {sizes} px, {phase.epochs} epochs, {per_call} samples per step over "
                     f"{world_size} process(es), {phase.optimizer.name} lr {phase.optimizer.lr} at batch "
                     f"{phase.optimizer.reference_batch}, validated at {list(phase.val_resolutions)} px{frozen}")
    return lines


def print_config(config: Optional[str], overrides: List[str]) -> None:
    cfg = load_config(config, overrides)
    plan = plan_run(cfg)
    print(to_yaml(cfg), end="")
    print("# resolved (comments, not keys):")
    for line in describe_plan(plan, launch_world_size()):
        print(f"#   {line}")
    if cfg.data.fused_decode:  # auto becomes a decoder here; a named one that cannot run is an error here
        print(f"#   JPEG decoder: {choose_decoders(cfg.data.jpeg_decoder).name}, resize: {resize_in_use()}")


def _resume_path(resume: str, cfg: Config) -> Optional[Path]:
    if resume != "auto":
        return Path(resume)
    runs = list_run_dirs(cfg)
    path = find_resumable(runs, warn=lambda m: print(m, file=sys.stderr))
    if path is None:
        print(f"--resume auto: no checkpoint of {cfg.name!r} under {cfg.logging.run_dir}/; starting afresh",
              file=sys.stderr)
    elif len(runs) > 1:
        print(f"--resume auto: {path} is the furthest of {len(runs)} runs of {cfg.name!r}", file=sys.stderr)
    return path


def train(config: Optional[str], overrides: List[str], resume: Optional[str], force: bool = False,
          check_only: bool = False) -> None:
    """Run (or resume) the recipe; ``check_only``: everything up to the first step, then print the plan."""
    cfg = load_config(config, overrides)
    state, run_dir = None, None
    path = _resume_path(resume, cfg) if resume else None
    if path is not None:
        state = resume_state(path)
        # The run continues with its saved config; --config replaces it, --set still applies on top.
        cfg = load_config(config, overrides, base=state["config"])
        run_dir = checkpoint_run_dir(path)
    plan = plan_launch(cfg, only_finetune=state is not None and state.get("phases") == ["finetune"])
    world_size = launch_world_size()
    if state is not None:
        check_resume(state, cfg, world_size, force, note=lambda m: print(m, file=sys.stderr))
        if (path is not None and path.name == final_checkpoint_name(plan.phases[-1].name)
                and not (check_only or force)):  # --resume-force still loads it into the changed run
            print(f"{checkpoint_run_dir(path)} is finished ({path.name}); nothing to resume", file=sys.stderr)
            remove_stale_temporaries(path.parent)  # what a killed write left; nothing else changes
            return
    datasets = check_data(plan, world_size)
    if check_only:
        for line in describe_plan(plan, world_size):
            print(line)
        print(f"check passed: training {datasets[0]}, validation {datasets[1]}"
              + (f", resuming from {path}" if path is not None else ""))
        return
    init_distributed()
    if state is not None:
        print(f"resuming from {path}", file=sys.stderr)
    Trainer(plan, datasets, run_dir=run_dir, resume=state).run()
