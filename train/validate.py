"""``python -m train.validate``: accuracy of checkpoints across test resolutions (the FixRes analysis).

Training on random-resized crops makes objects look larger than test-time centre crops do, so a network often
scores best above its training resolution; the sweep shows where, and how fine-tuning moves the curve. The eval
transform follows the checkpoint's ``data.eval_crop_pct`` and ``data.interpolation`` (``--set`` changes them, e.g.
to reproduce timm's or torchvision's published settings); ``--results-file`` keeps the rows as CSV or JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from data import build_dataset, build_transform

from .backends import TorchBackend, build_network
from .checkpoint import load_checkpoint, load_weights
from .cli import run_guarded
from .config import ConfigError, load_config
from .export import WEIGHT_KINDS, checkpoint_weights
from .phases import training_phase
from .task import ClassificationTask
from .trainer import evaluate

RESULT_COLUMNS = ("checkpoint", "phase", "weights", "resolution", "crop_pct", "interpolation", "loss", "top1",
                  "top5")


def sweep(checkpoint: Path, resolutions: List[int], overrides: List[str], device: str,
          weights: Optional[str] = None) -> List[Dict]:
    state = load_checkpoint(checkpoint)
    cfg = load_config(None, overrides + [f"train.device={device}", "precision.compute=fp32", "train.backend=torch",
                                         "train.compile=false", "train.compile_mode=default"],
                      base=state["config"])
    model = build_network(cfg)
    kind, chosen = checkpoint_weights(state, weights, checkpoint)
    load_weights(model, chosen, checkpoint)
    task = ClassificationTask(model, cfg.model.num_classes)
    backend = TorchBackend(cfg, training_phase(cfg), task, None)  # evaluation only: no optimizer
    val_set = build_dataset(cfg.data, "val", build_transform("eval", resolutions[0], cfg.data))
    rows = []
    for res in resolutions:
        row = {"checkpoint": str(checkpoint), "phase": state.get("phase_name"), "weights": kind, "resolution": res,
               "crop_pct": cfg.data.eval_crop_pct, "interpolation": cfg.data.interpolation}
        row.update(evaluate(backend, val_set, res, cfg.data))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def plot(rows: List[Dict], out: Path) -> List[str]:
    """Accuracy against test resolution, one curve per checkpoint; returns the curves' legend labels, which name
    the phase, the file and the weights (averaged, EMA or raw: they can differ by points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = []
    for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
        mine = [r for r in rows if r["checkpoint"] == ckpt]
        label = f"{mine[0]['phase'] or 'checkpoint'}: {Path(ckpt).name} ({mine[0]['weights']} weights)"
        labels.append(label)
        ax.plot([r["resolution"] for r in mine], [100 * r["top1"] for r in mine], marker="o", label=label)
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return labels


def write_results(rows: List[Dict], out: Path) -> None:
    """The rows as CSV (one line per checkpoint and resolution, timm's ``--results-file`` layout) or as a JSON
    list, by the file's suffix."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            if out.suffix.lower() == ".json":
                json.dump(rows, f, indent=1)
                return
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    except OSError as err:
        raise ConfigError(f"--results-file: cannot write {out}: {err.strerror or err}") from None


def parse_resolutions(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--resolutions: {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 8:
        raise ConfigError(f"--resolutions: {text!r} needs at least one resolution of 8 px or more")
    return values


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="checkpoint to evaluate (its per-epoch average if it has one, or --weights); repeat to "
                             "compare, e.g. before and after fine-tuning")
    parser.add_argument("--resolutions", default="128,160,192,224", help="comma-separated test resolutions")
    parser.add_argument("--plot", type=Path, help="draw accuracy against resolution into this PNG")
    parser.add_argument("--results-file", type=Path, help="also write the rows to this .csv or .json file")
    parser.add_argument("--weights", choices=WEIGHT_KINDS,
                        help="averaged, ema or raw weights of each checkpoint; default: averaged if there, else raw")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the checkpoint's config (e.g. data.path=...)")
    args = parser.parse_args(argv)
    def job() -> None:
        resolutions = parse_resolutions(args.resolutions)
        if args.results_file is not None and args.results_file.suffix.lower() not in (".csv", ".json"):
            raise ConfigError(f"--results-file: {args.results_file} must end in .csv or .json")
        rows = [r for ckpt in args.checkpoint
                for r in sweep(Path(ckpt), resolutions, args.overrides, args.device, args.weights)]
        if args.results_file is not None:
            write_results(rows, args.results_file)
            print(json.dumps({"results_file": str(args.results_file)}))
        if args.plot:
            print(json.dumps({"plot": str(args.plot), "curves": plot(rows, args.plot)}))

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
