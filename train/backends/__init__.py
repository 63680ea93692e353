"""Execution engines behind one interface: ``torch`` (CPU/CUDA) and ``ipu`` (PopTorch)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..config import Config
from ..phases import Phase
from ..task import ClassificationTask
from .base import Backend, EvalStats, StepStats
from .torch_backend import BackendError, TorchBackend


OptimizerFactory = Callable[[int], torch.optim.Optimizer]


def process_rank() -> int:
    """This process's rank: torch.distributed's, else the poprun instance index (0 outside both)."""
    if dist.is_initialized():
        return dist.get_rank()
    from ipu_options.distributed import instance_index  # imports popdist only if installed

    return instance_index()


def make_backend(cfg: Config, phase: Phase, task: ClassificationTask, make_optimizer: OptimizerFactory) -> Backend:
    """``make_optimizer(global_batch)`` builds the torch optimizer once the backend knows the global batch."""
    if cfg.train.backend == "ipu":
        from .ipu_backend import IPUBackend  # imports poptorch; only where asked for

        return IPUBackend(cfg, phase, task, make_optimizer)
    return TorchBackend(task, make_optimizer, device=cfg.train.device, precision=cfg.precision.compute,
                        loss_scale=cfg.precision.loss_scale, micro_batch_size=phase.micro_batch_size,
                        gradient_accumulation=phase.gradient_accumulation, data=cfg.data,
                        val_batch_size=cfg.train.val_batch_size, channels_last=cfg.train.channels_last,
                        compile=cfg.train.compile, compile_mode=cfg.train.compile_mode,
                        clip_grad_norm=phase.optimizer.clip_grad_norm)


__all__ = ["Backend", "BackendError", "EvalStats", "OptimizerFactory", "StepStats", "TorchBackend", "make_backend",
           "process_rank"]
