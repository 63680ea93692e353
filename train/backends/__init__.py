"""Execution engines behind one interface (:class:`Backend`): ``torch`` (CPU/CUDA) and ``ipu`` (PopTorch)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ipu_options.distributed import instance_index
from models import EfficientNet, build_model, param_groups
from models.norms import NormImplError
from models.splits import freeze_before

from ..config import Config
from ..optim import build_optimizer
from ..phases import Phase
from ..task import ClassificationTask
from .base import Backend, EvalStats, OptimizerFactory, StepStats
from .ipu_backend import IPUBackend
from .torch_backend import BackendError, TorchBackend, pick_device


def process_rank() -> int:
    """This process's rank: torch.distributed's, else the poprun instance index (0 outside both)."""
    return dist.get_rank() if dist.is_initialized() else instance_index()


def model_target(cfg: Config) -> str:
    """Where ``cfg``'s backend runs the model, what its norm units are built for: ``ipu``, or the torch device
    type (``train.device: auto`` resolved)."""
    return "ipu" if cfg.train.backend == "ipu" else pick_device(cfg.train.device).type


def build_network(cfg: Config) -> EfficientNet:
    """``cfg``'s model with its norm units built for where the backend runs it: ``model.norm_impl``'s ``auto`` is
    resolved here, once; a ``norm_impl`` that cannot run there is a BackendError."""
    try:
        return build_model(cfg.model, model_target(cfg), cfg.train.compile)
    except NormImplError as err:
        raise BackendError(str(err)) from None


def make_backend(cfg: Config, phase: Phase, model: nn.Module, *, offline: bool = False) -> Backend:
    """The backend of ``train.backend`` for one phase of ``model``: the layers before the phase's
    ``first_trainable`` frozen, the task around the model, and the phase's optimizer. ``offline`` (IPU only)
    compiles for an offline IPU target (``python -m ipu_options --compile-only``)."""
    frozen = freeze_before(model, phase.first_trainable) if phase.first_trainable else []
    task = ClassificationTask(model, cfg.model.num_classes, cfg.train.label_smoothing,
                              channels_last=cfg.train.channels_last, frozen=frozen)
    groups = param_groups(model, phase.optimizer.weight_decay)

    def make_optimizer(global_batch: int) -> torch.optim.Optimizer:
        return build_optimizer(phase.optimizer, groups, global_batch)

    if cfg.train.backend == "ipu":
        return IPUBackend(cfg, phase, task, make_optimizer, offline=offline)  # imports PopTorch
    return TorchBackend(cfg, phase, task, make_optimizer)


__all__ = ["Backend", "BackendError", "EvalStats", "IPUBackend", "OptimizerFactory", "StepStats", "TorchBackend",
           "build_network", "make_backend", "model_target", "process_rank"]
