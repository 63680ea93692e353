"""Optimizers of the recipes: TensorFlow-style RMSProp (the paper's), SGD and AdamW, with scaled learning rate."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Type

import torch

from .config import OptimizerConfig


def peak_lr(cfg: OptimizerConfig, global_batch: int) -> float:
    """Linear scaling: ``lr`` is given at ``reference_batch`` samples per optimizer step."""
    return cfg.lr * global_batch / cfg.reference_batch


def rmsprop_decay(cfg: OptimizerConfig, global_batch: int) -> float:
    """The paper's ``1 - 2^-14 * B`` (0.953125 at 768) unless set; kept in (0, 1)."""
    if cfg.rmsprop_decay is not None:
        return cfg.rmsprop_decay
    return min(max(1.0 - global_batch / 2.0 ** 14, 0.5), 0.999)


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow computes it, which the EfficientNet recipes were tuned with.

    It differs from ``torch.optim.RMSprop`` in three ways that matter at eps = 1e-3: the square average starts at
    one (not zero), eps sits inside the square root, and the learning rate is applied inside the momentum buffer.
    Weight decay is L2 added to the gradient, as in the paper's code.
    """

    def __init__(self, params: Iterable, lr: float, alpha: float = 0.9, eps: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p)
                    state["momentum_buffer"] = torch.zeros_like(p)
                square_avg = state["square_avg"]
                square_avg.mul_(group["alpha"]).addcmul_(grad, grad, value=1 - group["alpha"])
                update = grad / (square_avg + group["eps"]).sqrt()
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                p.sub_(buf)
        return loss


def hyperparameters(cfg: OptimizerConfig, global_batch: int) -> Dict[str, Any]:
    """The optimizer's settings, by the keyword names torch and PopTorch share: the one place each
    ``optimizer.name`` is turned into arguments (the IPU backend passes the same ones to PopTorch's classes)."""
    lr = peak_lr(cfg, global_batch)
    if cfg.name == "rmsprop_tf":
        return {"lr": lr, "alpha": rmsprop_decay(cfg, global_batch), "eps": cfg.eps, "momentum": cfg.momentum}
    if cfg.name == "sgd":
        return {"lr": lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov and cfg.momentum > 0}
    return {"lr": lr, "betas": tuple(cfg.betas), "eps": cfg.eps}


#: torch's class for each ``optimizer.name``.
TORCH_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "rmsprop_tf": RMSpropTF, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def build_optimizer(cfg: OptimizerConfig, groups: List[Dict], global_batch: int) -> torch.optim.Optimizer:
    """``groups`` come from :func:`models.param_groups` (weight decay already split)."""
    return TORCH_OPTIMIZERS[cfg.name](groups, **hyperparameters(cfg, global_batch))
