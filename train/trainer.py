"""The training loop, written once for every backend, and the run around it (folder, resume, signals, logs)."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from data import DataConfig, ImageDataset, build_dataset, build_transform
from data.seeding import derive_seed
from models import build_model, param_groups
from models.summary import count_macs

from .averaging import WeightAverage
from .backends import Backend, make_backend, process_rank
from .checkpoint import load_checkpoint, prune, save_checkpoint, step_checkpoint_name
from .config import Config, config_to_dict, to_yaml
from .logger import RunLogger
from .mixing import sample_mix
from .optim import build_optimizer, peak_lr
from .finetune import freeze_before
from .phases import Phase, finetune_phase, run_phases
from .schedule import lr_at
from .task import ClassificationTask


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint so a resumed run continues exactly."""

    phase: int = 0
    epoch: int = 0
    call: int = 0  # host calls done in this epoch
    step: int = 0  # optimizer steps done in this phase
    images: int = 0  # training images seen in this phase
    forward_macs: int = 0  # multiply-accumulates of the forward passes over those images
    seconds: float = 0.0  # wall time spent in this phase


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so it can save first."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate(backend: Backend, val_set: ImageDataset, resolution: int, data: DataConfig) -> Dict[str, float]:
    """Loss, top-1 and top-5 over the whole validation set (all processes) at one resolution."""
    val_set = val_set.with_transform(build_transform("eval", resolution, data))
    totals = torch.zeros(4, dtype=torch.float64)
    for images, labels in backend.eval_loader(val_set):
        s = backend.eval_call(images, labels)
        totals += torch.tensor([s.loss_sum, s.top1, s.top5, s.samples], dtype=torch.float64)
    loss, top1, top5, n = backend.sum_across_processes(totals).tolist()
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def new_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.logging.run_dir) / f"{cfg.name}-{stamp}"
    suffix = 1
    while path.exists():
        path = Path(cfg.logging.run_dir) / f"{cfg.name}-{stamp}-{suffix}"
        suffix += 1
    return path


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (run folder names must agree)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Trainer:
    """Runs the phases of one config in one run folder, resuming from a checkpoint state if given."""

    def __init__(self, cfg: Config, run_dir: Optional[Path] = None, resume: Optional[Dict[str, Any]] = None,
                 only_finetune: bool = False, start_from: Optional[Dict[str, torch.Tensor]] = None):
        self.cfg = cfg
        self.resume = resume
        self.rank = process_rank()  # torch.distributed rank, or the poprun instance index
        self.run_dir = Path(_broadcast(str(run_dir or new_run_dir(cfg))))
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.phases = [finetune_phase(cfg)] if only_finetune else run_phases(cfg)
        torch.manual_seed(cfg.train.seed)  # the initial weights, dropout and stochastic depth follow the seed
        self.model = build_model(cfg.model)
        if start_from is not None:
            self.model.load_state_dict(start_from)
        # Per-image forward MACs at every resolution the run uses, for the cost report (measured on the host
        # model now, before a backend moves it).
        resolutions = {s.resolution for p in self.phases for s in p.stages}
        self.macs = {r: count_macs(self.model, r, cfg.model.in_channels) for r in resolutions}
        self.train_set: ImageDataset = build_dataset(cfg.data, "train", build_transform("eval", 32, cfg.data))
        self.val_set: ImageDataset = build_dataset(cfg.data, "val", build_transform("eval", 32, cfg.data))
        self.last_checkpoint: Optional[Path] = None
        self.results: Dict[str, Any] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        state = self.resume
        position = Position(**state["position"]) if state else Position()
        if state:
            self.model.load_state_dict(state["model"])
            self.last_checkpoint = Path(state["path"]) if "path" in state else None
        self.logger = RunLogger(self.run_dir, config_to_dict(cfg), cfg.logging, enabled=self.is_main,
                                resume_id=state.get("wandb_id") if state else None)
        with self.logger, StopFlag() as stop:  # the logger marks the W&B run failed if this raises
            for index in range(position.phase, len(self.phases)):
                if index != position.phase:
                    position, state = Position(phase=index), None
                self.run_phase(self.phases[index], position, state, stop)
            self.logger.summary(self.results)
        return self.results

    def run_phase(self, phase: Phase, pos: Position, state: Optional[Dict[str, Any]], stop: StopFlag) -> None:
        cfg = self.cfg
        frozen = freeze_before(self.model, phase.first_trainable) if phase.first_trainable else []
        task = ClassificationTask(self.model, cfg.model.num_classes, cfg.train.label_smoothing,
                                  channels_last=cfg.train.channels_last, frozen=frozen)
        groups = param_groups(self.model, phase.optimizer.weight_decay)
        backend = make_backend(cfg, phase, task, lambda global_batch: build_optimizer(phase.optimizer, groups,
                                                                                      global_batch))
        peak = peak_lr(phase.optimizer, backend.global_batch)
        averages = self._averages(phase, state)
        if state:
            backend.load_state_dict(state["backend"])
            torch.set_rng_state(state["rng"]["torch"])
            if torch.cuda.is_available() and state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        calls = backend.calls_per_epoch(self.train_set)
        steps_per_epoch = calls * backend.steps_per_call
        total = phase.epochs * steps_per_epoch
        if phase.max_steps is not None:
            total = min(total, phase.max_steps)
        log_every = cfg.logging.log_every
        try:
            while pos.step < total:
                started, window_images, window_start = time.time(), 0, time.time()
                stage = phase.stage(pos.epoch)
                if stage.dropout is not None:
                    self.model.dropout.p = stage.dropout
                train_set = self.train_set.with_transform(
                    build_transform(phase.preprocessing, stage.resolution, cfg.data, stage.randaugment))
                mixing = stage.mixup_alpha > 0 or phase.cutmix_lambda is not None
                loader = backend.train_loader(train_set, seed=cfg.train.seed, epoch=pos.epoch, start_call=pos.call)
                bar = self.logger.progress(loader, total=calls - pos.call, desc=f"{phase.name} epoch {pos.epoch}")
                for images, labels in bar:
                    lr = lr_at(pos.step, steps_per_epoch, total, peak, phase.schedule)
                    backend.set_lr(lr)
                    mix = self._mix(phase, stage.mixup_alpha, backend, pos.step) if mixing else None
                    stats = backend.train_call(images, labels, mix)
                    if not math.isfinite(stats.loss):
                        kept = self.last_checkpoint or "none (no checkpoint was written yet)"
                        raise NonFiniteLoss(f"the training loss became {stats.loss} at step {pos.step + 1} of phase "
                                            f"{phase.name!r}; stopping. Last good checkpoint: {kept}")
                    pos.step += stats.steps
                    pos.call += 1
                    pos.images += stats.samples * backend.world_size
                    pos.forward_macs += stats.samples * backend.world_size * self.macs[stage.resolution]
                    window_images += stats.samples * backend.world_size
                    if averages.get("ema"):
                        averages["ema"].update(backend.model)  # backend.model syncs IPU weights
                    if pos.step % log_every == 0 or pos.step >= total:
                        now = time.time()
                        img_s = window_images / max(now - window_start, 1e-9)
                        window_images, window_start = 0, now
                        metrics = {"phase": phase.name, "epoch": pos.epoch, "resolution": stage.resolution,
                                   "train/loss": stats.loss, "train/acc": stats.top1 / stats.samples, "lr": lr,
                                   "images_per_s": img_s, "images": pos.images}
                        if getattr(backend, "loss_scale", None) is not None:
                            metrics["loss_scale"] = backend.loss_scale
                        self.logger.log(metrics, step=self._global_step(pos))
                        bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.top1 / stats.samples:.3f}",
                                        lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
                    every = cfg.checkpoint.every_steps
                    if stop.signum is not None or (every and pos.step % every == 0 and pos.step < total):
                        pos.seconds += time.time() - started
                        started = time.time()
                        self._save(phase, pos, backend, averages, step_checkpoint_name(phase.name, pos.step))
                        if stop.signum is not None:
                            raise Interrupted(f"stopped by signal {stop.signum} at step {pos.step} of phase "
                                              f"{phase.name!r}; checkpoint {self.last_checkpoint}. Resume with "
                                              f"--resume {self.last_checkpoint}")
                    if pos.step >= total:
                        break
                pos.seconds += time.time() - started
                if pos.call >= calls:
                    pos.epoch, pos.call = pos.epoch + 1, 0
                    if averages.get("epoch"):
                        averages["epoch"].update(backend.model)
                    if pos.epoch % cfg.train.validate_every == 0 and pos.step < total:
                        self._validate(phase, backend, averages, pos, final=False)
                    if pos.epoch % cfg.checkpoint.every_epochs == 0 and pos.step < total:
                        self._save(phase, pos, backend, averages, step_checkpoint_name(phase.name, pos.step))
            self._validate(phase, backend, averages, pos, final=True)
            self._report_cost(phase, pos)
            self._save(phase, pos, backend, averages, f"{phase.name}-final.pt")
            if averages.get("epoch") and averages["epoch"].state:
                # The next phase (and the final model) start from the averaged weights, as in the paper.
                averages["epoch"].copy_to(self.model)
        finally:
            backend.close()

    # --------------------------------------------------------------------------------------- helpers
    def _report_cost(self, phase: Phase, pos: Position) -> None:
        """What the phase cost: images, forward MACs (a full backward adds about twice that) and wall time."""
        cost = {"images": pos.images, "forward_macs": pos.forward_macs, "seconds": round(pos.seconds, 2),
                "steps": pos.step}
        self.results.update({f"{phase.name}/{k}": v for k, v in cost.items()})
        if self.is_main:
            print(json.dumps({"cost": phase.name, **cost}), flush=True)

    def _global_step(self, pos: Position) -> int:
        """Monotonic step for logs across phases (W&B needs increasing steps)."""
        return pos.step + sum(self.results.get(f"{p.name}/steps", 0) for p in self.phases[:pos.phase])

    def _averages(self, phase: Phase, state: Optional[Dict[str, Any]]) -> Dict[str, WeightAverage]:
        out: Dict[str, WeightAverage] = {}
        for key, decay in (("epoch", phase.weight_avg_decay), ("ema", phase.ema_decay)):
            if decay is not None:
                out[key] = WeightAverage(decay, self.model if key == "ema" else None)
                if state and state["averages"].get(key) is not None:
                    out[key].load_state_dict(state["averages"][key])
        return out

    def _mix(self, phase: Phase, alpha: float, backend: Backend, step: int) -> torch.Tensor:
        # Seeded by (seed, rank, phase, step): a resumed run draws exactly what the uninterrupted one did.
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, self.rank, self.phases.index(phase), step))
        return torch.cat([sample_mix(phase.micro_batch_size, alpha, phase.cutmix_lambda, gen)
                          for _ in range(backend.micro_batches_per_call)])

    def _validate(self, phase: Phase, backend: Backend, averages: Dict[str, WeightAverage], pos: Position,
                  final: bool) -> None:
        weights = {"": None}
        if final:
            weights.update({f"{k}_avg/": avg.state_dict() for k, avg in averages.items() if avg.state})
        metrics: Dict[str, Any] = {"phase": phase.name, "epoch": pos.epoch}
        current = ({k: v.detach().clone() for k, v in backend.model.state_dict().items()} if len(weights) > 1
                   else None)
        for prefix, state in weights.items():
            if state is not None:
                backend.set_weights({k: v.to(current[k].dtype) for k, v in state.items()})
            for res in phase.val_resolutions:
                for name, value in evaluate(backend, self.val_set, res, self.cfg.data).items():
                    metrics[f"val/{prefix}{name}@{res}"] = value
        if current is not None:
            backend.set_weights(current)
        self.logger.log(metrics, step=self._global_step(pos))
        if final:
            self.results.update({f"{phase.name}/{k}": v for k, v in metrics.items() if k.startswith("val/")})
            if self.is_main:
                shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/") and "/loss" not in k}
                print(json.dumps({"phase": phase.name, **shown}), flush=True)

    def _save(self, phase: Phase, pos: Position, backend: Backend, averages: Dict[str, WeightAverage],
              name: str) -> None:
        state = {
            "model": backend.model.state_dict(),  # backend.model: the host model with the device's weights
            "backend": backend.state_dict(),
            "averages": {k: a.state_dict() for k, a in averages.items()},
            "position": dataclasses.asdict(pos),
            "phase_name": phase.name,
            "phases": [p.name for p in self.phases],
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "config": config_to_dict(self.cfg),
            "wandb_id": self.logger.wandb_id,
        }
        if self.is_main:
            self.last_checkpoint = save_checkpoint(state, self.ckpt_dir / name)
            prune(self.ckpt_dir, phase.name, self.cfg.checkpoint.keep)
        if dist.is_initialized():
            dist.barrier()


def resume_state(path: Path) -> Dict[str, Any]:
    state = load_checkpoint(path)
    state["path"] = str(path)
    return state


def checkpoint_run_dir(path: Path) -> Path:
    return path.resolve().parent.parent


def list_run_dirs(cfg: Config) -> List[Path]:
    root = Path(cfg.logging.run_dir)
    return sorted(root.glob(f"{cfg.name}-*")) if root.is_dir() else []


def start_weights(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights a checkpoint hands on: its per-epoch average if it has one (the paper fine-tunes from it)."""
    return state["averages"].get("epoch") or state["model"]
