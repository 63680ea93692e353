"""Torch backend: CPU or CUDA, autocast precision, channels-last, torch.compile, accumulation and DDP."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from data import EpochLoader, ImageDataset

from ..config import Config
from ..phases import Phase
from ..task import ClassificationTask
from .base import Backend, EvalStats, OptimizerFactory, StepStats

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BackendError(ValueError):
    """A setting this backend cannot honour on this machine; names the config key."""


def check_torch_settings(device: str, precision: str) -> None:
    """The torch backend's settings that depend on the machine: raises BackendError naming the key."""
    if precision not in AUTOCAST:
        raise BackendError(f"precision.compute: {precision!r} is an IPU setting; the torch backend takes "
                           "fp32, bf16 or fp16")
    if precision == "fp16" and pick_device(device).type != "cuda":
        raise BackendError("precision.compute: fp16 needs CUDA (loss scaling); use bf16 or fp32 on the CPU")


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise BackendError("train.device: 'cuda' was asked for but torch sees no CUDA device; use cpu or auto")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(setting)


class TorchBackend(Backend):
    """``make_optimizer`` may be None for evaluation only (``python -m train.validate``)."""

    def __init__(self, cfg: Config, phase: Phase, task: ClassificationTask,
                 make_optimizer: Optional[OptimizerFactory]) -> None:
        t, precision = cfg.train, cfg.precision.compute
        check_torch_settings(t.device, precision)
        self.device = pick_device(t.device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.task = task.to(self.device)
        if t.channels_last:
            self.task.to(memory_format=torch.channels_last)
        self.micro = phase.micro_batch_size
        self.accumulation = phase.gradient_accumulation
        self._optimizer = make_optimizer(self.global_batch) if make_optimizer else None
        self.autocast_dtype = AUTOCAST[precision]
        self.scaler = torch.cuda.amp.GradScaler(init_scale=cfg.precision.loss_scale) if precision == "fp16" else None
        self.data = cfg.data
        self.val_batch_size = t.val_batch_size
        self.clip_grad_norm = phase.optimizer.clip_grad_norm
        # Loaders live for the phase (persistent workers): one for training, one per eval transform.
        self._loaders: Dict[Tuple[bool, Any], EpochLoader] = {}
        self.runner: Any = self.task  # the task, wrapped by DDP and/or torch.compile
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = nn.parallel.DistributedDataParallel(self.task, device_ids=ids)
        if t.compile:
            self.runner = torch.compile(self.runner, mode=t.compile_mode)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            raise RuntimeError("this backend was built for evaluation only (no optimizer)")
        return self._optimizer

    # ----------------------------------------------------------------------------------------- geometry
    def host_model(self) -> nn.Module:
        return self.task.model

    def log_metrics(self) -> Dict[str, float]:
        return {"loss_scale": float(self.scaler.get_scale())} if self.scaler else {}

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world_size

    @property
    def micro_batches_per_call(self) -> int:
        return self.accumulation

    @property
    def steps_per_call(self) -> int:
        return 1

    def _loader(self, dataset: ImageDataset, batch: int, *, train: bool, seed: int = 0, epoch: int = 0,
                start_call: int = 0) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
        key = (train, None if train else dataset.transform)
        cached = self._loaders.get(key)
        if cached is None or not cached.serves(dataset, batch, seed):
            if cached is not None:
                cached.close()
            cached = self._loaders[key] = EpochLoader(
                dataset, batch, shuffle=train, seed=seed, rank=self.rank, world_size=self.world_size,
                workers=self.data.workers, drop_last=train,
                pin_memory=self.data.pin_memory and self.device.type == "cuda",
                persistent_workers=self.data.persistent_workers, prefetch_factor=self.data.prefetch_factor)
        return cached.epoch(epoch, start_call)

    def train_loader(self, dataset, *, seed, epoch, start_call):
        # One host call = one optimizer step = micro x accumulation samples of this rank's shard.
        return self._loader(dataset, self.micro * self.accumulation, train=True, seed=seed, epoch=epoch,
                            start_call=start_call)

    def calls_per_epoch(self, dataset: ImageDataset) -> int:
        return len(dataset) // (self.micro * self.accumulation * self.world_size)

    def eval_loader(self, dataset):
        return self._loader(dataset, self.val_batch_size, train=False)

    # ------------------------------------------------------------------------------------------- steps
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train_call(self, images: torch.Tensor, labels: torch.Tensor, mix: Optional[torch.Tensor]) -> StepStats:
        """Forward and backward over the accumulated micro-batches, then one optimizer step unless the job-wide
        loss or the gradient norm is not finite (then the update is dropped and ``applied`` is False).

        The loss and hits are summed over processes before the decision, and DDP's gradients are already the
        same everywhere, so every process takes the same decision. With fp16, infinite gradients are the loss
        scaler's business (it skips the step and lowers the scale, as it should); only a non-finite loss counts.
        """
        self.task.train()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, top1 = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        chunks = zip(images.split(self.micro), labels.split(self.micro),
                     mix.split(self.micro) if mix is not None else [None] * self.accumulation, strict=True)
        for i, (x, y, m) in enumerate(chunks):
            last = i == self.accumulation - 1
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.runner.no_sync()
            with sync:
                with self._autocast():
                    loss, hits, _ = self.runner(x, y, m)
                scaled = loss / self.accumulation
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
            top1 += hits.detach()
        totals = torch.stack([loss_sum, top1])
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss_mean = totals[0].item() / (self.accumulation * self.world_size)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        applied = math.isfinite(loss_mean) and (self.scaler is not None or math.isfinite(grad_norm))
        if self.scaler:
            if applied:
                self.scaler.step(self.optimizer)  # itself skips a step with infinite gradients
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        return StepStats(loss=loss_mean, top1=totals[1].item() / self.world_size, samples=len(labels), steps=1,
                         applied=applied, grad_norm=grad_norm)

    def _clip_gradients(self) -> float:
        """The global L2 norm of the (unscaled) gradients, after clipping them to ``optimizer.clip_grad_norm``."""
        params: List[torch.Tensor] = [p for p in self.task.parameters() if p.grad is not None]
        limit = self.clip_grad_norm if self.clip_grad_norm is not None else math.inf
        return float(torch.nn.utils.clip_grad_norm_(params, limit))

    @torch.no_grad()
    def eval_call(self, images: torch.Tensor, labels: torch.Tensor) -> EvalStats:
        self.task.eval()
        images, labels = images.to(self.device), labels.to(self.device)
        with self._autocast():
            loss, top1, top5 = self.task(images, labels)
        return EvalStats(loss.item() * len(labels), top1.item(), top5.item(), len(labels))

    def set_weights(self, state: Dict[str, torch.Tensor]) -> None:
        self.task.model.load_state_dict(state)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        for loader in self._loaders.values():
            loader.close()
        self._loaders.clear()

    def sum_across_processes(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        # gloo reduces CPU tensors, NCCL device tensors.
        t = values.to(self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.cpu()
