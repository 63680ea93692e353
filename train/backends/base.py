"""The interface between the training loop and an execution engine (torch on CPU/CUDA, or PopTorch on IPUs).

The loop owns epochs, the learning-rate schedule, mixing parameters, weight averages, validation, checkpoints
and logging; a backend owns devices, precision, distribution and how one host call turns into optimizer steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from data import ImageDataset


@dataclass
class StepStats:
    """What one train call did, job-wide: mean loss; top-1 hits (against unmixed labels) as a share of this
    process's ``samples`` (so ``top1 / samples`` is the job's accuracy); optimizer steps; whether the update was
    applied (a step whose loss or gradients are not finite is dropped, see :mod:`train.trainer`); and the global
    gradient norm before clipping, where the backend sees it."""

    loss: float
    top1: float
    samples: int
    steps: int
    applied: bool = True
    grad_norm: Optional[float] = None


@dataclass
class EvalStats:
    loss_sum: float
    top1: float
    top5: float
    samples: int


OptimizerFactory = Callable[[int], torch.optim.Optimizer]


class Backend(ABC):
    """One training phase on one engine, built as ``Backend(cfg, phase, task, make_optimizer)``:
    ``make_optimizer(global_batch)`` builds the torch optimizer once the backend knows the global batch."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def host_model(self) -> nn.Module:
        """The host copy of the network with the current weights, which the loop checkpoints and averages. On IPUs
        this copies the weights from the device when they changed since the last call (one copy per host call
        with a per-step EMA); on torch it is the training module itself."""

    def log_metrics(self) -> Dict[str, float]:
        """Backend-specific figures for the metric lines (e.g. the loss scale with fp16)."""
        return {}

    @property
    @abstractmethod
    def global_batch(self) -> int:
        """Samples per optimizer step over the whole job: micro x accumulation x replicas."""

    @property
    @abstractmethod
    def micro_batches_per_call(self) -> int:
        """Micro-batches in one host call (mixing parameters are drawn per micro-batch)."""

    @property
    @abstractmethod
    def steps_per_call(self) -> int:
        """Optimizer steps one train call performs (device iterations on IPUs, 1 on torch)."""

    @abstractmethod
    def train_loader(self, dataset: ImageDataset, *, seed: int, epoch: int,
                     start_call: int) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches of one epoch, each one host call, starting at call ``start_call``."""

    @abstractmethod
    def calls_per_epoch(self, dataset: ImageDataset) -> int:
        ...

    @abstractmethod
    def eval_loader(self, dataset: ImageDataset) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
        ...

    @abstractmethod
    def train_call(self, images: torch.Tensor, labels: torch.Tensor, mix: Optional[torch.Tensor]) -> StepStats:
        ...

    @abstractmethod
    def eval_call(self, images: torch.Tensor, labels: torch.Tensor) -> EvalStats:
        """Evaluate a batch with the current host weights (the loop swaps averaged weights in and out)."""

    @abstractmethod
    def set_weights(self, state: Dict[str, torch.Tensor]) -> None:
        """Replace the network's weights on the host and the device (to evaluate averaged weights)."""

    @abstractmethod
    def set_lr(self, lr: float) -> None:
        ...

    @abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """Optimizer (and loss-scaler) state for checkpoints."""

    @abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        ...

    @abstractmethod
    def sum_across_processes(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a small host tensor over all processes (metrics)."""

    def any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (one all-reduce; nothing to do alone). Every
        process must call it at the same point: the stop protocol (train/stop.py) calls it after each host call
        and each validation batch."""
        if self.world_size == 1:
            return flag
        return bool(self.sum_across_processes(torch.tensor([float(flag)], dtype=torch.float64))[0] > 0)

    def close(self) -> None:  # noqa: B027 -- optional: most backends hold nothing to release
        """Release devices and workers."""
