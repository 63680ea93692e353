"""Normalisation layers and the norm + activation unit every conv in the network is followed by.

``batch`` is the original EfficientNet. ``group`` and ``layer`` (GroupNorm with one group) compute statistics per
sample, so the result does not depend on the micro-batch — the point on IPUs, whose micro-batches are tiny.
With ``proxy_norm`` the norm loses its affine and a :class:`ProxyNormActivation` owns gamma/beta instead.

The modules hold the parameters (and so the state-dict keys); how a group/layer-norm unit computes is chosen per
call: the Triton kernels (``fused_norm``, CUDA), else one memory-lean autograd Function (``norm_autograd``,
models/norm_act.py, docs/performance.md), else the plain modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .fused_norm import fused_norm_act, fused_scale_norm, use_fused
from .norm_act import NormAutograd, kernel_param, norm_proxy_swish, norm_swish, use_function
from .proxy_norm import ProxyMode, ProxyNormActivation

NormKind = Literal["batch", "group", "layer"]


@dataclass(frozen=True)
class NormSpec:
    """What every norm in one model is: kind, groups for ``group``, epsilon, and whether proxy norm follows."""

    kind: NormKind = "batch"
    num_groups: int = 4
    eps: float = 1e-3
    proxy_norm: bool = False
    bn_momentum: float = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention
    fused_norm: Literal["auto", "on", "off"] = "auto"  # Triton kernels for group/layer norms: see fused_norm.py
    norm_autograd: NormAutograd = "auto"  # the PyTorch path of group/layer norms: see norm_act.py

    def __post_init__(self) -> None:
        if self.proxy_norm and self.kind == "batch":
            raise ValueError("proxy_norm needs a batch-independent norm (group or layer), not batch")


def norm_layer(spec: NormSpec, channels: int, affine: bool = True) -> nn.Module:
    if spec.kind == "batch":
        return nn.BatchNorm2d(channels, eps=spec.eps, momentum=spec.bn_momentum, affine=affine)
    groups = 1 if spec.kind == "layer" else spec.num_groups
    if channels % groups:
        raise ValueError(f"group norm with {groups} groups cannot split {channels} channels evenly")
    return nn.GroupNorm(groups, channels, eps=spec.eps, affine=affine)


class NormAct(nn.Module):
    """Norm then swish; with proxy norm, an affine-free norm then the proxy-normalised swish."""

    def __init__(self, spec: NormSpec, channels: int, proxy_mode: ProxyMode = "full"):
        super().__init__()
        self.norm = norm_layer(spec, channels, affine=not spec.proxy_norm)
        self.act: nn.Module = ProxyNormActivation(channels, proxy_mode) if spec.proxy_norm else nn.SiLU()
        self.fused_norm = spec.fused_norm  # chosen per call: the device is only known at forward time
        self.norm_autograd = spec.norm_autograd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(self.fused_norm, self.norm, x):
            assert isinstance(self.norm, nn.GroupNorm)  # use_fused checked it
            return fused_norm_act(self.norm, self.act, x)
        if use_function(self.norm_autograd, self.norm, x, self.act):
            return self._function(x, deferred=False)
        return self.act(self.norm(x))

    def forward_deferred(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Output and the per-channel scale still to apply (``None`` without proxy norm)."""
        if isinstance(self.act, ProxyNormActivation) and self.act.mode == "deferred_scale":
            if use_fused(self.fused_norm, self.norm, x):
                assert isinstance(self.norm, nn.GroupNorm)
                return fused_norm_act(self.norm, self.act, x, deferred=True)
            if use_function(self.norm_autograd, self.norm, x, self.act):
                return self._function(x, deferred=True)
            return self.act.forward_deferred(self.norm(x))
        return self(x), None

    def _function(self, x: torch.Tensor, deferred: bool) -> Any:
        """The unit as one autograd Function, on the modules' own parameters (models/norm_act.py)."""
        norm, act = self.norm, self.act
        assert isinstance(norm, nn.GroupNorm)  # use_function() chose this path for group/layer norms only
        if isinstance(act, ProxyNormActivation):
            # Called as a plain forward, a deferred-scale unit only centres (as ProxyNormActivation.forward does).
            mode = "deferred_scale" if deferred else ("full" if act.mode == "full" else "center_only")
            return norm_proxy_swish(x, norm.num_groups, norm.eps, act.weight, act.bias, act.proxy_bias,
                                    act.proxy_weight, act.quantiles, act.eps, mode)
        return norm_swish(x, norm.num_groups, norm.eps, norm.weight, norm.bias)


class ScaleOnlyNorm(nn.Module):
    """Affine-free norm times a per-channel scale, without shift.

    The projection conv of a proxy-normed block has no activation after it, so proxy norm does not apply; the
    reference implementation drops the norm's shift there instead.
    """

    def __init__(self, spec: NormSpec, channels: int):
        super().__init__()
        self.norm = norm_layer(spec, channels, affine=False)
        self.weight = nn.Parameter(torch.ones(channels))
        self.fused_norm = spec.fused_norm
        self.norm_autograd = spec.norm_autograd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(self.fused_norm, self.norm, x):
            assert isinstance(self.norm, nn.GroupNorm)
            return fused_scale_norm(self.norm, self.weight, x)
        if use_function(self.norm_autograd, self.norm, x):
            assert isinstance(self.norm, nn.GroupNorm)
            # group norm's own affine (weight, no bias): one op that saves x only, not the product's two inputs
            return F.group_norm(x, self.norm.num_groups, kernel_param(self.weight, x), None, self.norm.eps)
        return self.norm(x) * self.weight.to(x.dtype).view(1, -1, 1, 1)


def projection_norm(spec: NormSpec, channels: int) -> nn.Module:
    """The norm after a linear (no activation) projection conv."""
    return ScaleOnlyNorm(spec, channels) if spec.proxy_norm else norm_layer(spec, channels)


NORM_MODULES = (nn.BatchNorm2d, nn.GroupNorm, ScaleOnlyNorm, ProxyNormActivation)
