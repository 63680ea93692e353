"""The training loop, written once for every backend, and the run around it (folder, resume, stop, logs).

What a run guarantees (README, "Runs, checkpoints and resuming"):

- **Stops.** A SIGINT/SIGTERM reaching any process stops every process at the same step boundary, with one
  interrupt checkpoint and exit code 130 (the protocol is in :mod:`train.stop`).
- **Non-finite steps.** A step whose loss or gradients are NaN/inf is never applied. ``train.nonfinite: stop``
  ends the run at once; ``skip`` drops the step and ends the run after ``train.max_nonfinite_skips`` in a row.
  Either way the error names the newest checkpoint that still trains: a checkpoint is only vouched for once a step
  computed from its weights was finite (:class:`CheckpointLedger`); the newer ones are set aside.
- **Storage.** Checkpoints are atomic; a full or unwritable disk stops the run with one line and leaves the earlier
  checkpoints loadable; a checkpoint is written before every validation, so a failure there loses nothing.
- **Logs.** ``metrics.jsonl`` and W&B share one global step that keeps increasing across phases and resumes;
  ``phase`` and ``phase_step`` are fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from data import DataConfig, ImageDataset, build_transform
from data.seeding import derive_seed
from data.worker_signals import stop_signals_deferred
from models.measure import count_macs

from .averaging import WeightAverage
from .backends import Backend, StepStats, build_network, make_backend, process_rank
from .checkpoint import (
    CheckpointError,
    best_checkpoint_name,
    final_checkpoint_name,
    load_checkpoint,
    load_weights,
    prune,
    remove_stale_temporaries,
    save_checkpoint,
    set_aside,
    step_checkpoint_name,
)
from .config import Config, config_to_dict, to_yaml
from .errors import Interrupted, NonFiniteLoss, StorageError
from .logger import ProgressBar, RunLogger
from .mixing import sample_mix
from .optim import peak_lr
from .phases import Phase, Stage
from .run_plan import RunPlan
from .schedule import lr_at
from .stop import StopSignals


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
    nonfinite_steps: int = 0  # steps dropped in this phase because their loss or gradients were not finite
    nonfinite_streak: int = 0  # of which the most recent ones in a row
    pending_validation: bool = False  # written just before a validation (which a resume then runs first)


class CheckpointLedger:
    """Which checkpoints are known to train.

    A checkpoint's weights are vouched for once the next step computed from them had a finite loss and gradients;
    until then it is pending. Weights can be finite and still useless (magnitude 1e16 after a too-large learning
    rate), and only the next step shows it, so after a non-finite step the pending ones are set aside (renamed
    ``*.pt.nonfinite``: ``--resume auto`` skips them) and the run names the newest vouched-for one.
    """

    def __init__(self) -> None:
        self.good: Optional[Path] = None
        self.pending: List[Path] = []

    def written(self, path: Path) -> None:
        self.pending = [p for p in self.pending if p != path] + [path]

    def step_was_finite(self) -> None:
        if self.pending:
            self.good, self.pending = self.pending[-1], []

    def set_aside_pending(self, main: bool) -> List[Path]:
        """Rename the pending checkpoints (on the main process, which wrote them); returns their new names."""
        moved = [set_aside(p) if main and p.exists() else p for p in self.pending]
        if self.good in self.pending:
            self.good = None
        self.pending = []
        return moved


class _StopInValidation(Exception):
    """The processes agreed to stop while validating (the checkpoint before validation holds the run)."""


def evaluate(backend: Backend, val_set: ImageDataset, resolution: int, data: DataConfig,
             should_stop: Callable[[], bool] = lambda: False) -> Dict[str, float]:
    """Loss, top-1 and top-5 over the whole validation set (all processes) at one resolution.

    ``should_stop`` is asked before every batch on every process (it may agree across processes)."""
    val_set = val_set.with_transform(build_transform("eval", resolution, data))
    totals = torch.zeros(4, dtype=torch.float64)
    with stop_signals_deferred():
        batches = iter(backend.eval_loader(val_set))
    for images, labels in batches:
        if should_stop():
            raise _StopInValidation
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
    """Rank 0's value on every rank (run folder names and set-up errors must agree)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _finite_weights(weights: Dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())


@dataclass
class _PhaseRun:
    """One phase on its backend and how long it runs: what the loop's helpers share."""

    phase: Phase
    backend: Backend
    averages: Dict[str, WeightAverage]  # "epoch" (per-epoch average) and "ema" (per step), where enabled
    calls: int  # host calls per epoch
    steps_per_epoch: int
    total: int  # optimizer steps of the phase


class _Throughput:
    """Images per second since the previous reading (the metric lines' ``images_per_s``)."""

    def __init__(self) -> None:
        self.images, self.since = 0, time.time()

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> float:
        now = time.time()
        rate = self.images / max(now - self.since, 1e-9)
        self.images, self.since = 0, now
        return rate


def _trained(stats: StepStats) -> bool:
    """The step was applied and its loss is finite (backends drop a step whose gradients are not)."""
    return stats.applied and math.isfinite(stats.loss)


class Trainer:
    """Runs the phases of one validated plan in one run folder, resuming from a checkpoint state if given.

    ``datasets`` are the checked training and validation sets from :func:`train.run_plan.check_data`.
    """

    def __init__(self, plan: RunPlan, datasets: Tuple[ImageDataset, ImageDataset], run_dir: Optional[Path] = None,
                 resume: Optional[Dict[str, Any]] = None, start_from: Optional[Dict[str, torch.Tensor]] = None,
                 start_from_path: Optional[Path] = None):
        self.cfg = cfg = plan.cfg
        self.phases: List[Phase] = list(plan.phases)
        self.resume = resume
        self.rank = process_rank()  # torch.distributed rank, or the poprun instance index
        self.run_dir = Path(_broadcast(str(run_dir or new_run_dir(cfg))))
        self.ckpt_dir = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.train.seed)  # the initial weights, dropout and stochastic depth follow the seed
        self.model = build_network(cfg)
        if start_from is not None:
            load_weights(self.model, start_from, start_from_path or Path("<weights>"))
        # Per-image forward MACs at every resolution the run uses, for the cost report (measured on the host
        # model now, before a backend moves it).
        resolutions = {s.resolution for p in self.phases for s in p.stages}
        self.macs = {r: count_macs(self.model, r, cfg.model.in_channels) for r in resolutions}
        self.train_set, self.val_set = datasets
        self.results: Dict[str, Any] = dict(resume.get("results", {})) if resume else {}
        self.last_checkpoint: Optional[Path] = None
        self.ledger = CheckpointLedger()
        self.stop = StopSignals()
        self.clock = 0.0  # when the training time not yet added to Position.seconds began

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> Dict[str, Any]:
        self._prepare_run_dir()
        if self.is_main:
            print(f"run folder: {self.run_dir}", file=sys.stderr)
            print(f"norm units: {self.model.norm_impl} (model.norm_impl: {self.cfg.model.norm_impl})", file=sys.stderr)
        state = self.resume
        position = Position(**state["position"]) if state else Position()
        if state:
            resumed = Path(state["path"])
            load_weights(self.model, state["model"], resumed)
            self.last_checkpoint = resumed
            self.ledger.written(resumed)
        self.logger = RunLogger(self.run_dir, config_to_dict(self.cfg), self.cfg.logging, enabled=self.is_main,
                                resume_id=state.get("wandb_id") if state else None)
        with self.stop, self.logger:  # the logger marks the W&B run failed if this raises
            for index in range(position.phase, len(self.phases)):
                if index != position.phase:
                    position, state = Position(phase=index), None
                self.run_phase(self.phases[index], position, state)
            self.logger.summary(self.results)
            self._log_weights()
        return self.results

    def _prepare_run_dir(self) -> None:
        """Create the run folder and write ``config.yaml`` (rank 0); every rank learns whether that worked."""
        self._main_writes(self._write_run_dir, None)

    def _write_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            self.ckpt_dir.mkdir(exist_ok=True)
            remove_stale_temporaries(self.ckpt_dir)
        except OSError as err:
            raise StorageError(f"cannot write the run folder {self.run_dir}: {err.strerror or err}; set "
                               "logging.run_dir to a writable folder") from None

    def run_phase(self, phase: Phase, pos: Position, state: Optional[Dict[str, Any]]) -> None:
        run = self._start_phase(phase, state)
        try:
            if pos.pending_validation and pos.step < run.total:
                self._validate(run, pos, final=False)  # the one the checkpoint preceded
            while pos.step < run.total:
                self._train_epoch(run, pos)
                if pos.call >= run.calls:
                    self._end_epoch(run, pos)
            self._save(run, pos, final_checkpoint_name(phase.name), before_validation=True)
            self._validate(run, pos, final=True)
            self._report_cost(phase, pos)
            if run.averages.get("epoch") and run.averages["epoch"].state:
                # The next phase (and the final model) start from the averaged weights, as in the paper.
                run.averages["epoch"].copy_to(self.model)
        finally:
            run.backend.close()

    def _start_phase(self, phase: Phase, state: Optional[Dict[str, Any]]) -> _PhaseRun:
        backend = make_backend(self.cfg, phase, self.model)
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
        return _PhaseRun(phase, backend, averages, calls, steps_per_epoch, total)

    # ------------------------------------------------------------------------------------------ loop
    def _train_epoch(self, run: _PhaseRun, pos: Position) -> None:
        """Host calls from ``pos`` to the end of the epoch (or the phase): the step, its accounting, the
        non-finite policy, the metric line, then the stop protocol and the step checkpoints."""
        stage = run.phase.stage(pos.epoch)
        peak = peak_lr(run.phase.optimizer, run.backend.global_batch)
        bar = self._epoch_batches(run, stage, pos)
        throughput = _Throughput()
        self.clock = time.time()
        # The bar is advanced by hand: tqdm's own iteration counts a call only when the next one is asked for, so
        # a phase that ends mid-epoch would leave it one short. ``with`` ends its line before any error is printed.
        with bar:
            for images, labels in bar.iterable:
                lr = lr_at(pos.step, run.steps_per_epoch, run.total, peak, run.phase.schedule)
                stats = self._step(run, stage, pos, images, labels, lr)
                throughput.add(self._count(run, stage, pos, stats))
                bar.update(1)
                self._apply_nonfinite_policy(run, pos, stats)
                if pos.step % self.cfg.logging.log_every == 0 or pos.step >= run.total:
                    self._log_step(run, stage, pos, lr, stats, throughput.read(), bar)
                self._stop_or_checkpoint(run, pos)
                if pos.step >= run.total:
                    break
        self._add_training_time(pos)

    def _epoch_batches(self, run: _PhaseRun, stage: Stage, pos: Position) -> ProgressBar:
        """This process's remaining host calls of the epoch behind the progress bar, with the stage's dropout
        and transform (resolution, RandAugment)."""
        if stage.dropout is not None:
            self.model.dropout.p = stage.dropout
        train_set = self.train_set.with_transform(
            build_transform(run.phase.preprocessing, stage.resolution, self.cfg.data, stage.randaugment))
        with stop_signals_deferred():
            batches: Iterator = iter(run.backend.train_loader(train_set, seed=self.cfg.train.seed, epoch=pos.epoch,
                                                              start_call=pos.call))
        return self.logger.progress(batches, total=run.calls - pos.call,
                                    desc=f"{run.phase.name} epoch {pos.epoch + 1}/{run.phase.epochs}")

    def _step(self, run: _PhaseRun, stage: Stage, pos: Position, images: torch.Tensor, labels: torch.Tensor,
              lr: float) -> StepStats:
        """One host call: the scheduled learning rate, the step's mixup/CutMix draw, the update."""
        run.backend.set_lr(lr)
        mixing = stage.mixup_alpha > 0 or run.phase.cutmix_lambda is not None
        mix = self._mix(run, stage.mixup_alpha, pos.step) if mixing else None
        return run.backend.train_call(images, labels, mix)

    def _count(self, run: _PhaseRun, stage: Stage, pos: Position, stats: StepStats) -> int:
        """Move ``pos`` past one host call (steps, calls, images, forward MACs); returns the images, all processes."""
        pos.step += stats.steps
        pos.call += 1
        images = stats.samples * run.backend.world_size
        pos.images += images
        pos.forward_macs += images * self.macs[stage.resolution]
        return images

    def _apply_nonfinite_policy(self, run: _PhaseRun, pos: Position, stats: StepStats) -> None:
        """A finite step vouches for the pending checkpoints and feeds the per-step EMA; any other was dropped
        and goes to ``train.nonfinite`` (:meth:`_nonfinite_step`)."""
        if _trained(stats):
            pos.nonfinite_streak = 0
            self.ledger.step_was_finite()
            if run.averages.get("ema"):
                run.averages["ema"].update(run.backend.host_model())
        else:
            self._nonfinite_step(run.phase, pos, stats.loss, stats.grad_norm)

    def _log_step(self, run: _PhaseRun, stage: Stage, pos: Position, lr: float, stats: StepStats,
                  images_per_s: float, bar: ProgressBar) -> None:
        """One metric line (metrics.jsonl, W&B) and the bar's figures."""
        metrics: Dict[str, Any] = {
            "phase": run.phase.name, "phase_step": pos.step, "epoch": pos.epoch, "resolution": stage.resolution,
            "lr": lr, "images_per_s": images_per_s, "images": pos.images, "train/nonfinite_steps": pos.nonfinite_steps}
        if _trained(stats):
            metrics.update({"train/loss": stats.loss, "train/acc": stats.top1 / stats.samples})
            if stats.grad_norm is not None:
                metrics["train/grad_norm"] = stats.grad_norm
        metrics.update(run.backend.log_metrics())
        self.logger.log(metrics, step=self._global_step(pos))
        bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.top1 / stats.samples:.3f}", lr=f"{lr:.2e}",
                        img_s=f"{images_per_s:.0f}")

    def _stop_or_checkpoint(self, run: _PhaseRun, pos: Position) -> None:
        """After every host call the processes agree whether to stop (train/stop.py). A stop, and every
        ``checkpoint.every_steps`` steps, writes a checkpoint; a stop then ends the run (exit code 130)."""
        stopping = run.backend.any_process(self.stop.requested)
        every = self.cfg.checkpoint.every_steps
        if stopping or (every and pos.step % every == 0 and pos.step < run.total):
            self._add_training_time(pos)
            self._save(run, pos, step_checkpoint_name(run.phase.name, pos.step))
        if stopping:
            raise self._interrupted(run.phase, pos)

    def _add_training_time(self, pos: Position) -> None:
        """Add the time since :attr:`clock` to ``pos.seconds`` (checkpoints written in between count, validation
        does not) and restart the clock."""
        now = time.time()
        pos.seconds += now - self.clock
        self.clock = now

    def _end_epoch(self, run: _PhaseRun, pos: Position) -> None:
        cfg = self.cfg
        pos.epoch, pos.call = pos.epoch + 1, 0
        if run.averages.get("epoch"):
            run.averages["epoch"].update(run.backend.host_model())
        if pos.step >= run.total:
            return  # the phase's end saves and validates
        validate = pos.epoch % cfg.train.validate_every == 0
        if validate or pos.epoch % cfg.checkpoint.every_epochs == 0:
            self._save(run, pos, step_checkpoint_name(run.phase.name, pos.step), before_validation=validate)
        if validate:
            self._validate(run, pos, final=False)

    # --------------------------------------------------------------------------------- failure paths
    def _nonfinite_step(self, phase: Phase, pos: Position, loss: float, grad_norm: Optional[float]) -> None:
        """A dropped step: count it, then carry on (``skip``, below the limit) or stop (exit code 3)."""
        t = self.cfg.train
        pos.nonfinite_steps += 1
        pos.nonfinite_streak += 1
        what = f"loss {loss}" + (f", gradient norm {grad_norm}" if grad_norm is not None else "")
        if t.nonfinite == "skip" and pos.nonfinite_streak < t.max_nonfinite_skips:
            if self.is_main:
                print(f"warning: step {pos.step} of phase {phase.name!r} was not finite ({what}) and was dropped "
                      f"({pos.nonfinite_streak} in a row; train.max_nonfinite_skips: {t.max_nonfinite_skips})",
                      file=sys.stderr)
            return
        moved = self.ledger.set_aside_pending(self.is_main)
        why = (f"train.nonfinite: skip, {pos.nonfinite_streak} steps in a row" if t.nonfinite == "skip"
               else "train.nonfinite: stop")
        good = self.ledger.good or "none (no checkpoint has trained finitely yet)"
        aside = f"; set aside {', '.join(p.name for p in moved)} (its weights led here)" if moved else ""
        raise NonFiniteLoss(f"the training step {pos.step} of phase {phase.name!r} was not finite ({what}; {why}); "
                            f"it was not applied. Last checkpoint that trains: {good}{aside}. Resume from it with "
                            "a lower optimizer.lr, optimizer.clip_grad_norm or train.nonfinite: skip")

    def _interrupted(self, phase: Phase, pos: Position) -> Interrupted:
        signals = f" ({self.stop.count} signals; the first one counts)" if self.stop.count > 1 else ""
        return Interrupted(f"stopped by {self.stop.name}{signals} at step {pos.step} of phase {phase.name!r}; "
                           f"checkpoint {self.last_checkpoint}. Resume with --resume {self.last_checkpoint} "
                           "(or --resume auto)")

    # --------------------------------------------------------------------------------------- helpers
    def _report_cost(self, phase: Phase, pos: Position) -> None:
        """What the phase cost: images, forward MACs (a full backward adds about twice that) and wall time."""
        cost = {"images": pos.images, "forward_macs": pos.forward_macs, "seconds": round(pos.seconds, 2),
                "steps": pos.step, "nonfinite_steps": pos.nonfinite_steps}
        self.results.update({f"{phase.name}/{k}": v for k, v in cost.items()})
        if self.is_main:
            print(json.dumps({"cost": phase.name, **cost}), flush=True)

    def _global_step(self, pos: Position) -> int:
        """Monotonic step for logs across phases and resumes (W&B needs increasing steps)."""
        return pos.step + sum(self.results.get(f"{p.name}/steps", 0) for p in self.phases[:pos.phase])

    def _averages(self, phase: Phase, state: Optional[Dict[str, Any]]) -> Dict[str, WeightAverage]:
        out: Dict[str, WeightAverage] = {}
        for key, decay in (("epoch", phase.weight_avg_decay), ("ema", phase.ema_decay)):
            if decay is not None:
                out[key] = WeightAverage(decay, self.model if key == "ema" else None)
                if state and state["averages"].get(key) is not None:
                    out[key].load_state_dict(state["averages"][key])
        return out

    def _mix(self, run: _PhaseRun, alpha: float, step: int) -> torch.Tensor:
        # Seeded by (seed, rank, phase, step): a resumed run draws exactly what the uninterrupted one did.
        phase_index = self.phases.index(run.phase)
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, self.rank, phase_index, step))
        return torch.cat([sample_mix(run.phase.micro_batch_size, alpha, run.phase.cutmix_lambda, gen)
                          for _ in range(run.backend.micro_batches_per_call)])

    def _validate(self, run: _PhaseRun, pos: Position, final: bool) -> None:
        phase, backend = run.phase, run.backend
        weights: Dict[str, Optional[Dict[str, torch.Tensor]]] = {"": None}
        if final:
            weights.update({f"{k}_avg/": avg.state_dict() for k, avg in run.averages.items() if avg.state})
        metrics: Dict[str, Any] = {"phase": phase.name, "phase_step": pos.step, "epoch": pos.epoch}
        current = ({k: v.detach().clone() for k, v in backend.host_model().state_dict().items()} if len(weights) > 1
                   else None)
        should_stop = lambda: backend.any_process(self.stop.requested)  # noqa: E731
        try:
            for prefix, state in weights.items():
                if state is not None and current is not None:
                    backend.set_weights({k: v.to(current[k].dtype) for k, v in state.items()})
                for res in phase.val_resolutions:
                    for name, value in evaluate(backend, self.val_set, res, self.cfg.data, should_stop).items():
                        metrics[f"val/{prefix}{name}@{res}"] = value
        except _StopInValidation:
            raise self._interrupted(phase, pos) from None
        if current is not None:
            backend.set_weights(current)
        self.logger.log(metrics, step=self._global_step(pos))
        if self.is_main:
            print(validation_line(phase, pos, metrics), file=sys.stderr, flush=True)
        self._keep_best(run, metrics)
        if final:
            self.results.update({f"{phase.name}/{k}": v for k, v in metrics.items() if k.startswith("val/")})
            if self.is_main:
                shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/") and "/loss" not in k}
                print(json.dumps({"phase": phase.name, **shown}), flush=True)

    def _keep_best(self, run: _PhaseRun, metrics: Dict[str, Any]) -> None:
        """``checkpoint.keep_best``: the checkpoint written before this validation becomes ``<phase>-best.pt`` when
        its top-1 beats the phase's best so far (kept in the results, so a resume knows it)."""
        phase = run.phase
        key = f"val/top1@{phase.val_resolutions[0]}"
        best = f"{phase.name}/best/{key}"
        scored = self.last_checkpoint
        if not self.cfg.checkpoint.keep_best or scored is None:
            return
        if metrics[key] <= self.results.get(best, -1.0):
            return
        self.results.update({best: metrics[key], f"{phase.name}/best/phase_step": metrics["phase_step"]})
        self._main_writes(
            lambda: save_checkpoint(load_checkpoint(scored), self.ckpt_dir / best_checkpoint_name(phase.name)),
            run.backend, "process 0 could not write the best checkpoint; see its error")

    def _log_weights(self) -> None:
        """Each phase's final and best checkpoint as versions of one W&B ``model`` artifact per phase."""
        for phase in self.phases:
            scores = {k: v for k, v in self.results.items() if k.startswith(f"{phase.name}/")}
            for alias, name in (("final", final_checkpoint_name(phase.name)),
                                ("best", best_checkpoint_name(phase.name))):
                if (self.ckpt_dir / name).is_file():
                    self.logger.log_artifact(self.ckpt_dir / name, f"{self.cfg.name}-{phase.name}", "model", [alias],
                                             {"checkpoint": name, **scores})

    def _save(self, run: _PhaseRun, pos: Position, name: str, before_validation: bool = False) -> None:
        """Write a checkpoint (rank 0) that every process then knows by name; any failure stops every process."""
        phase, backend = run.phase, run.backend
        state: Dict[str, Any] = {
            "model": backend.host_model().state_dict(),
            "backend": backend.state_dict(),
            "averages": {k: a.state_dict() for k, a in run.averages.items()},
            "position": dataclasses.asdict(dataclasses.replace(pos, pending_validation=before_validation)),
            "phase_name": phase.name,
            "phases": [p.name for p in self.phases],
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "config": config_to_dict(self.cfg),
            "results": dict(self.results),
            "world_size": backend.world_size,
            "wandb_id": self.logger.wandb_id,
        }
        path = self.ckpt_dir / name
        if self.is_main and not _finite_weights(state["model"]):
            raise NonFiniteLoss(f"the weights are not finite at step {pos.step} of phase {phase.name!r}; "
                                f"{path} was not written. Last checkpoint that trains: {self.ledger.good}")

        def write() -> None:
            save_checkpoint(state, path)
            prune(self.ckpt_dir, phase.name, self.cfg.checkpoint.keep, protect=self.ledger.good)

        self._main_writes(write, backend, f"process 0 could not write checkpoint {path}; see its error")
        self.last_checkpoint = path
        self.ledger.written(path)

    def _main_writes(self, write: Callable[[], Any], backend: Optional[Backend], failure: str = "") -> None:
        """Rank 0 writes, every rank agrees on the error: ``write`` runs on the main process only, and a
        :class:`StorageError` (or :class:`CheckpointError`) there stops every process, so none waits for one that
        stopped. The agreement is also the barrier: nobody runs ahead of the write. Through ``backend`` the other
        processes raise ``failure``; before there is a backend (None), torch.distributed hands them the main
        process's own message."""
        error = ""
        if self.is_main:
            try:
                write()
            except (StorageError, CheckpointError) as err:
                error = str(err)
        if backend is None:
            error = _broadcast(error)
        elif backend.any_process(bool(error)):
            error = error or failure
        if error:
            raise StorageError(error)


def validation_line(phase: Phase, pos: Position, metrics: Dict[str, Any]) -> str:
    """The console's line per validation: epochs done, top-1/top-5 at every resolution and weights, loss, time."""
    scores = []
    found = (key[len("val/"):].split("top1@") for key in metrics if key.startswith("val/") and "top1@" in key)
    for prefix, res in sorted(found, key=lambda pr: (pr[0], int(pr[1]))):  # raw weights first, then averages
        weights = f" ({prefix.rstrip('/').replace('_avg', '')} average)" if prefix else ""
        top1, top5, loss = (metrics[f"val/{prefix}{name}@{res}"] for name in ("top1", "top5", "loss"))
        scores.append(f"top-1 {100 * top1:.2f} % top-5 {100 * top5:.2f} % loss {loss:.3f} @{res}{weights}")
    return (f"{phase.name} epoch {pos.epoch}/{phase.epochs}, step {pos.step}, {pos.seconds:.0f} s training: "
            + "; ".join(scores))


def resume_state(path: Path) -> Dict[str, Any]:
    state = load_checkpoint(path)
    state["path"] = str(path)
    return state


def checkpoint_run_dir(path: Path) -> Path:
    return path.resolve().parent.parent


def list_run_dirs(cfg: Config) -> List[Path]:
    return run_dirs_named(Path(cfg.logging.run_dir), cfg.name)


def run_dirs_named(root: Path, name: str) -> List[Path]:
    """The run folders :func:`new_run_dir` made for ``name`` under ``root``, oldest first: ``<name>-<date>-<time>``
    and ``...-<n>``, not the folders of another name that starts with ``name-`` (``gn`` and ``gn-half``)."""
    own = re.compile(re.escape(name) + r"-\d{8}-\d{6}(-\d+)?")
    return sorted(p for p in root.glob(f"{name}-*") if own.fullmatch(p.name)) if root.is_dir() else []


def start_weights(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights a checkpoint hands on: its per-epoch average if it has one (the paper fine-tunes from it)."""
    return state["averages"].get("epoch") or state["model"]
