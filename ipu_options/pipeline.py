"""Put a network on IPUs: pipeline blocks, recomputation checkpoints and IPU precision.

All functions take the ``poptorch`` module as an argument (the real one, or a test fake) and change the copy of
the network the IPU backend owns, never the trainer's host model.
"""

from __future__ import annotations

from types import ModuleType
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.norms import ScaleOnlyNorm
from models.proxy_norm import ProxyNormActivation

from .plan import StagePlan

FLOAT_NORMS = (nn.GroupNorm, nn.BatchNorm2d)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def annotate_pipeline(model: nn.Module, stages: Sequence[StagePlan], poptorch: ModuleType) -> List[str]:
    """``poptorch.BeginBlock`` on each stage's first module (user id ``stage<i>``, ``ipu_id`` from the config),
    and ``poptorch.recomputationCheckpoint`` on the outputs of the modules of every ``recompute`` stage (in
    training mode only: the inference model traces the same network in eval mode).

    Returns the names of the checkpointed modules. BeginBlock modifies the module in place and raises if it
    already has a block, so a network is annotated once.
    """
    for stage in stages:
        module = model.get_submodule(stage.start)
        _set_submodule(model, stage.start, poptorch.BeginBlock(module, f"stage{stage.index}", ipu_id=stage.ipu))
    checkpointed = []
    for stage in stages:
        if not stage.recompute:
            continue
        for name in stage.modules:
            if name == "classifier":  # the logits are the graph's output: nothing to recompute after them
                continue
            model.get_submodule(name).register_forward_hook(_checkpoint_hook(poptorch))
            checkpointed.append(name)
    return checkpointed


def _checkpoint_hook(poptorch: ModuleType):
    def hook(module: nn.Module, _inputs, output):
        # Checkpoints only mean something where there is a backward pass: the inference model shares this
        # network and is traced in eval mode, so its graph gets none.
        return poptorch.recomputationCheckpoint(output) if module.training else None

    return hook


# --------------------------------------------------------------------------------------------------- precision
class FloatGroupNorm(nn.GroupNorm):
    """A GroupNorm (LayerNorm) computed in float inside a half network: input cast up, output cast to half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).half()


class FloatBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm computed in float inside a half network: input cast up, output cast to half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).half()


def _in_float(norm: nn.Module) -> nn.Module:
    """``norm`` as its float-computing class, holding the same parameter and buffer tensors, in the same mode."""
    new: nn.Module
    if isinstance(norm, nn.GroupNorm):
        new = FloatGroupNorm(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
    else:
        assert isinstance(norm, nn.BatchNorm2d)
        new = FloatBatchNorm2d(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    for name, tensor in [*norm.named_parameters(recurse=False), *norm.named_buffers(recurse=False)]:
        setattr(new, name, tensor)
    return new.train(norm.training)


def _half_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.half()
    return self._conv_forward(x.half(), self.weight.half(), bias)


def _half_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.half()
    return F.linear(x.half(), self.weight.half(), bias)


def prepare_precision(network: nn.Module, compute: str, norm_precision: str = "float") -> torch.dtype:
    """Make ``network`` compute as ``compute`` says and return the dtype its input should have.

    - ``fp32``: unchanged.
    - ``16.16``: weights and activations in half (``network.half()``). Norm layers (GroupNorm/LayerNorm) stay
      in float with their input cast up and output cast down when ``norm_precision`` is ``float`` (the PopTorch
      guide's recipe for fp32 norms in a half model: each becomes its ``Float*`` class, same state-dict keys);
      proxy-norm and scale-only norm parameters always stay
      float: their statistics are computed in float and the result is cast to the activation dtype.
    - ``16.32``: float master weights (the optimizer updates fp32), half compute: every conv and linear casts
      its input and weights to half inside the graph, so the PopTorch dispatcher does not upcast the op to float
      (mixed inputs are upcast: docs/ipu.md, "PopTorch 3.4 facts"). Norms run in float.
    """
    if compute == "fp32":
        return torch.float32
    if compute not in ("16.16", "16.32"):
        raise ValueError(f"IPU precision {compute!r} is not one of 16.16, 16.32, fp32")
    float_norms = compute == "16.32" or norm_precision == "float"

    def stays_float(m: nn.Module) -> bool:
        return isinstance(m, (ProxyNormActivation, ScaleOnlyNorm)) or (float_norms and isinstance(m, FLOAT_NORMS))

    for m in network.modules():
        if compute == "16.16" and not stays_float(m):
            # network.half() minus the modules kept in float (cast before their values lose precision).
            for p in m.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.half()
            for name, b in m.named_buffers(recurse=False):
                if b is not None and b.is_floating_point():
                    setattr(m, name, b.half())
        if compute == "16.32":
            if isinstance(m, nn.Conv2d):
                m.forward = _half_conv_forward.__get__(m)  # type: ignore[method-assign]
            elif isinstance(m, nn.Linear):
                m.forward = _half_linear_forward.__get__(m)  # type: ignore[method-assign]
    if float_norms:
        for name in [n for n, m in network.named_modules() if isinstance(m, FLOAT_NORMS)]:
            _set_submodule(network, name, _in_float(network.get_submodule(name)))
    return torch.float16
