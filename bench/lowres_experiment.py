"""Reduced-resolution training, measured: three arms on the same budget of training epochs.

(a) train at the native resolution; (b) train at the low resolution and test at native without fine-tuning;
(c) train at the low resolution for all but ``--finetune-epochs`` epochs, then fine-tune at native (the paper's
recipe: averaged weights, eval preprocessing, frozen trunk). Each arm prints one JSON line: test accuracy at the
native resolution, wall time, images and forward MACs spent. Defaults use the real CIFAR-10 JPEG tarball,
upsampled (64 native / 48 low) so the network has spatial extent.

    python -m bench.lowres_experiment --device cuda --epochs 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from train.config import load_config
from train.run_plan import check_data, plan_run
from train.trainer import Trainer

DEFAULT_TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def arm_overrides(arm: str, args: argparse.Namespace) -> List[str]:
    common = [
        "model.num_classes=10", f"model.width_mult={args.width}", f"model.depth_mult={args.depth}",
        "data.dataset=tar", f"data.path={args.data}", f"data.workers={args.workers}",
        f"data.train_subset={args.train_subset}", f"data.val_subset={args.val_subset}",
        "data.crop_scale=[0.25,1.0]", f"train.device={args.device}", f"train.micro_batch_size={args.batch_size}",
        f"train.val_batch_size={args.batch_size * 2}", f"precision.compute={args.precision}",
        "train.weight_avg_decay=0.6", "optimizer.name=adamw",
        f"optimizer.lr={args.lr}", f"optimizer.reference_batch={args.batch_size}", "optimizer.eps=1e-8",
        "optimizer.weight_decay=0.05", "schedule.name=cosine", "schedule.warmup_epochs=0.5", f"train.seed={args.seed}",
        "logging.wandb=disabled", "logging.log_every=1000000", f"logging.run_dir={args.run_dir}",
        f"train.val_resolutions=[{args.native}]", f"train.channels_last={str(args.device == 'cuda').lower()}",
    ]
    if arm == "native":
        return common + [f"train.resolution={args.native}", f"train.epochs={args.epochs}"]
    if arm == "low":
        return common + [f"train.resolution={args.low}", f"train.epochs={args.epochs}"]
    return common + [
        f"train.resolution={args.low}", f"train.epochs={args.epochs - args.finetune_epochs}", "finetune.enabled=true",
        f"finetune.resolution={args.native}", f"finetune.epochs={args.finetune_epochs}",
        f"finetune.first_trainable={args.first_trainable}", f"finetune.optimizer.lr={args.finetune_lr}",
        f"finetune.optimizer.reference_batch={args.batch_size}",
    ]


def run_arm(arm: str, args: argparse.Namespace) -> Dict:
    cfg = load_config(args.config, arm_overrides(arm, args))
    started = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the modulo-32 note for 48 vs 64 is expected here
        plan = plan_run(cfg)
        results = Trainer(plan, check_data(plan, world_size=1)).run()
    last = "finetune" if arm == "low+finetune" else "train"
    phases = ["train", "finetune"] if arm == "low+finetune" else ["train"]
    return {
        "arm": arm,
        "train_resolution": args.native if arm == "native" else args.low,
        "test_resolution": args.native,
        "top1": round(results[f"{last}/val/top1@{args.native}"], 4),
        "top1_averaged": (round(results[f"{last}/val/epoch_avg/top1@{args.native}"], 4)
                          if f"{last}/val/epoch_avg/top1@{args.native}" in results else None),
        "seconds": round(time.time() - started, 1),
        "train_seconds": round(sum(results[f"{p}/seconds"] for p in phases), 1),
        "images": sum(results[f"{p}/images"] for p in phases),
        "forward_gmacs": round(sum(results[f"{p}/forward_macs"] for p in phases) / 1e9, 1),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lowres_experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_TARBALL, help="CIFAR-10 JPEG tarball (train/, test/)")
    parser.add_argument("--config", default="configs/models/efficientnet-b0-g16-ln-pn.yml")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--native", type=int, default=64)
    parser.add_argument("--low", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=4, help="training budget of every arm, in epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--first-trainable", default="blocks.5.0")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--finetune-lr", type=float, default=0.05)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--val-subset", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="native,low,low+finetune")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data} does not exist; pass --data PATH to the CIFAR-10 JPEG tarball", file=sys.stderr)
        return 2
    if args.epochs <= args.finetune_epochs:
        print("error: --epochs must exceed --finetune-epochs", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        args.run_dir = tmp
        for arm in args.arms.split(","):
            print(json.dumps(run_arm(arm, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
