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
from .backends import Backend, build_network, make_backend, process_rank
from .checkpoint import (
    CheckpointError,
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
from .logger import RunLogger
from .mixing import sample_mix
from .optim import peak_lr
from .phases import Phase
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> Dict[str, Any]:
        self._prepare_run_dir()
        if self.is_main:
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
        error = None
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
                self.ckpt_dir.mkdir(exist_ok=True)
                for stale in remove_stale_temporaries(self.ckpt_dir):
                    print(f"removed {stale}, left by an interrupted checkpoint write", file=sys.stderr)
            except OSError as err:
                error = (f"cannot write the run folder {self.run_dir}: {err.strerror or err}; set logging.run_dir "
                         "to a writable folder")
        error = _broadcast(error)
        if error:
            raise StorageError(error)

    def run_phase(self, phase: Phase, pos: Position, state: Optional[Dict[str, Any]]) -> None:
        backend, averages = self._start_phase(phase, state)
        calls = backend.calls_per_epoch(self.train_set)
        steps_per_epoch = calls * backend.steps_per_call
        total = phase.epochs * steps_per_epoch
        if phase.max_steps is not None:
            total = min(total, phase.max_steps)
        try:
            if pos.pending_validation and pos.step < total:
                self._validate(phase, backend, averages, pos, final=False)  # the one the checkpoint preceded
            while pos.step < total:
                self._train_epoch(phase, backend, averages, pos, calls, steps_per_epoch, total)
                if pos.call >= calls:
                    self._end_epoch(phase, backend, averages, pos, total)
            self._save(phase, pos, backend, averages, final_checkpoint_name(phase.name), before_validation=True)
            self._validate(phase, backend, averages, pos, final=True)
            self._report_cost(phase, pos)
            if averages.get("epoch") and averages["epoch"].state:
                # The next phase (and the final model) start from the averaged weights, as in the paper.
                averages["epoch"].copy_to(self.model)
        finally:
            backend.close()

    def _start_phase(self, phase: Phase, state: Optional[Dict[str, Any]]) -> Tuple[Backend, Dict[str, WeightAverage]]:
        backend = make_backend(self.cfg, phase, self.model)
        averages = self._averages(phase, state)
        if state:
            backend.load_state_dict(state["backend"])
            torch.set_rng_state(state["rng"]["torch"])
            if torch.cuda.is_available() and state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return backend, averages

    def _train_epoch(self, phase: Phase, backend: Backend, averages: Dict[str, WeightAverage], pos: Position,
                     calls: int, steps_per_epoch: int, total: int) -> None:
        """Host calls from ``pos`` to the end of the epoch (or the phase), stopping on an agreed signal."""
        cfg = self.cfg
        stage = phase.stage(pos.epoch)
        if stage.dropout is not None:
            self.model.dropout.p = stage.dropout
        train_set = self.train_set.with_transform(
            build_transform(phase.preprocessing, stage.resolution, cfg.data, stage.randaugment))
        mixing = stage.mixup_alpha > 0 or phase.cutmix_lambda is not None
        peak = peak_lr(phase.optimizer, backend.global_batch)
        with stop_signals_deferred():
            batches: Iterator = iter(backend.train_loader(train_set, seed=cfg.train.seed, epoch=pos.epoch,
                                                          start_call=pos.call))
        bar = self.logger.progress(batches, total=calls - pos.call, desc=f"{phase.name} epoch {pos.epoch}")
        started = window_start = time.time()
        window_images = 0
        for images, labels in bar:
            lr = lr_at(pos.step, steps_per_epoch, total, peak, phase.schedule)
            backend.set_lr(lr)
            mix = self._mix(phase, stage.mixup_alpha, backend, pos.step) if mixing else None
            stats = backend.train_call(images, labels, mix)
            pos.step += stats.steps
            pos.call += 1
            seen = stats.samples * backend.world_size
            pos.images += seen
            pos.forward_macs += seen * self.macs[stage.resolution]
            window_images += seen
            if stats.applied and math.isfinite(stats.loss):
                pos.nonfinite_streak = 0
                self.ledger.step_was_finite()
                if averages.get("ema"):
                    averages["ema"].update(backend.host_model())
            else:
                self._nonfinite_step(phase, pos, stats.loss, stats.grad_norm)
            if pos.step % cfg.logging.log_every == 0 or pos.step >= total:
                now = time.time()
                img_s = window_images / max(now - window_start, 1e-9)
                window_images, window_start = 0, now
                metrics: Dict[str, Any] = {
                    "phase": phase.name, "phase_step": pos.step, "epoch": pos.epoch, "resolution": stage.resolution,
                    "lr": lr, "images_per_s": img_s, "images": pos.images, "train/nonfinite_steps": pos.nonfinite_steps}
                if stats.applied and math.isfinite(stats.loss):
                    metrics.update({"train/loss": stats.loss, "train/acc": stats.top1 / stats.samples})
                    if stats.grad_norm is not None:
                        metrics["train/grad_norm"] = stats.grad_norm
                metrics.update(backend.log_metrics())
                self.logger.log(metrics, step=self._global_step(pos))
                bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.top1 / stats.samples:.3f}",
                                lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
            stopping = backend.any_process(self.stop.requested)
            every = cfg.checkpoint.every_steps
            if stopping or (every and pos.step % every == 0 and pos.step < total):
                pos.seconds += time.time() - started
                started = time.time()
                self._save(phase, pos, backend, averages, step_checkpoint_name(phase.name, pos.step))
            if stopping:
                raise self._interrupted(phase, pos)
            if pos.step >= total:
                break
        pos.seconds += time.time() - started

    def _end_epoch(self, phase: Phase, backend: Backend, averages: Dict[str, WeightAverage], pos: Position,
                   total: int) -> None:
        cfg = self.cfg
        pos.epoch, pos.call = pos.epoch + 1, 0
        if averages.get("epoch"):
            averages["epoch"].update(backend.host_model())
        if pos.step >= total:
            return  # the phase's end saves and validates
        validate = pos.epoch % cfg.train.validate_every == 0
        if validate or pos.epoch % cfg.checkpoint.every_epochs == 0:
            self._save(phase, pos, backend, averages, step_checkpoint_name(phase.name, pos.step),
                       before_validation=validate)
        if validate:
            self._validate(phase, backend, averages, pos, final=False)

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

    def _mix(self, phase: Phase, alpha: float, backend: Backend, step: int) -> torch.Tensor:
        # Seeded by (seed, rank, phase, step): a resumed run draws exactly what the uninterrupted one did.
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, self.rank, self.phases.index(phase), step))
        return torch.cat([sample_mix(phase.micro_batch_size, alpha, phase.cutmix_lambda, gen)
                          for _ in range(backend.micro_batches_per_call)])

    def _validate(self, phase: Phase, backend: Backend, averages: Dict[str, WeightAverage], pos: Position,
                  final: bool) -> None:
        weights: Dict[str, Optional[Dict[str, torch.Tensor]]] = {"": None}
        if final:
            weights.update({f"{k}_avg/": avg.state_dict() for k, avg in averages.items() if avg.state})
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
        self._keep_best(phase, backend, metrics)
        if final:
            self.results.update({f"{phase.name}/{k}": v for k, v in metrics.items() if k.startswith("val/")})
            if self.is_main:
                shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/") and "/loss" not in k}
                print(json.dumps({"phase": phase.name, **shown}), flush=True)

    def _keep_best(self, phase: Phase, backend: Backend, metrics: Dict[str, Any]) -> None:
        """``checkpoint.keep_best``: the checkpoint written before this validation becomes ``<phase>-best.pt`` when
        its top-1 beats the phase's best so far (kept in the results, so a resume knows it)."""
        key = f"val/top1@{phase.val_resolutions[0]}"
        best = f"{phase.name}/best/{key}"
        if not self.cfg.checkpoint.keep_best or self.last_checkpoint is None:
            return
        if metrics[key] <= self.results.get(best, -1.0):
            return
        self.results.update({best: metrics[key], f"{phase.name}/best/phase_step": metrics["phase_step"]})
        error = ""
        if self.is_main:
            try:
                save_checkpoint(load_checkpoint(self.last_checkpoint), self.ckpt_dir / best_checkpoint_name(phase.name))
            except (StorageError, CheckpointError) as err:  # every rank must hear of it, or the others wait
                error = str(err)
        if backend.any_process(bool(error)):
            raise StorageError(error or "process 0 could not write the best checkpoint; see its error")

    def _log_weights(self) -> None:
        """Each phase's final and best checkpoint as versions of one W&B ``model`` artifact per phase."""
        for phase in self.phases:
            scores = {k: v for k, v in self.results.items() if k.startswith(f"{phase.name}/")}
            for alias, name in (("final", final_checkpoint_name(phase.name)),
                                ("best", best_checkpoint_name(phase.name))):
                if (self.ckpt_dir / name).is_file():
                    self.logger.log_artifact(self.ckpt_dir / name, f"{self.cfg.name}-{phase.name}", "model", [alias],
                                             {"checkpoint": name, **scores})

    def _save(self, phase: Phase, pos: Position, backend: Backend, averages: Dict[str, WeightAverage],
              name: str, before_validation: bool = False) -> None:
        """Write a checkpoint (rank 0) that every process then knows by name; any failure stops every process."""
        state: Dict[str, Any] = {
            "model": backend.host_model().state_dict(),
            "backend": backend.state_dict(),
            "averages": {k: a.state_dict() for k, a in averages.items()},
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
        error = ""
        if self.is_main:
            if not _finite_weights(state["model"]):
                raise NonFiniteLoss(f"the weights are not finite at step {pos.step} of phase {phase.name!r}; "
                                    f"{path} was not written. Last checkpoint that trains: {self.ledger.good}")
            try:
                save_checkpoint(state, path)
                prune(self.ckpt_dir, phase.name, self.cfg.checkpoint.keep, protect=self.ledger.good)
            except StorageError as err:
                error = str(err)
        if backend.any_process(bool(error)):  # also the barrier: nobody runs ahead of the write
            raise StorageError(error or f"process 0 could not write checkpoint {path}; see its error")
        self.last_checkpoint = path
        self.ledger.written(path)


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


def best_checkpoint_name(phase: str) -> str:
    """Where ``checkpoint.keep_best`` keeps a phase's best checkpoint (not a resume candidate before the others)."""
    return f"{phase}-best.pt"


def start_weights(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights a checkpoint hands on: its per-epoch average if it has one (the paper fine-tunes from it)."""
    return state["averages"].get("epoch") or state["model"]
