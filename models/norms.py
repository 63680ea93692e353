"""Normalisation layers and the norm + activation unit every conv in the network is followed by.

``batch`` is the original EfficientNet. ``group`` and ``layer`` (GroupNorm with one group) compute statistics per
sample, so the result does not depend on the micro-batch — the point on IPUs, whose micro-batches are tiny.
With ``proxy_norm`` the norm loses its affine and a :class:`ProxyNormActivation` owns gamma/beta instead.

The units are one module family, as timm's ``norm_act`` layers: :class:`NormAct` and :class:`ScaleOnlyNorm` run
the plain modules; their subclasses compute the same on the same parameters (so the same state-dict keys) as one
memory-lean autograd Function (``Function*``, models/norm_act.py, docs/performance.md) or the Triton kernels
(``Triton*``, models/fused_norm.py, experimental). Which class a unit is, is decided once, when the model is built,
from ``model.norm_impl`` (:func:`resolve_norm_impl`); nothing is chosen per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .config import NormImpl, NormKind, check_norm
from .fused_norm import device_error, fused_norm_act, fused_scale_norm
from .layout import channel_view
from .norm_act import DYNAMO_TRACES_FUNCTIONS, kernel_param, norm_proxy_swish, norm_swish
from .proxy_norm import ProxyMode, ProxyNormActivation

#: What ``auto`` resolves to, and what a unit runs: ``norm_impl`` without ``auto``.
UnitImpl = Literal["modules", "function", "triton"]


class NormImplError(ValueError):
    """A ``model.norm_impl`` the model's target cannot run; names the key."""


def resolve_norm_impl(setting: NormImpl, kind: NormKind, target: str = "cpu", compiled: bool = False) -> UnitImpl:
    """The implementation of every norm unit of a model built for ``target`` (once, at construction).

    BatchNorm units are always modules. ``auto``: the Function on the CPU, except under torch.compile on a torch
    whose dynamo cannot trace it (2.0); the modules on CUDA (the Function has run on CPUs only, and a default must
    be a path that has run on its hardware) and on the IPU; never the Triton kernels, which have not passed on a
    GPU yet. The IPU takes the modules only: PopART differentiates the traced graph itself and never runs a custom
    backward. ``triton`` needs Triton and CUDA (or Triton's interpreter on the CPU, for tests).
    """
    if target == "ipu" and setting in ("function", "triton"):
        raise NormImplError(f"model.norm_impl: {setting} cannot run on the IPU (PopART differentiates the traced "
                            "modules itself); use auto or modules")
    if setting == "triton":
        reason = device_error(target)
        if reason is not None:
            raise NormImplError(f"model.norm_impl: triton, but the fused Triton norm kernels cannot run: {reason}; "
                                "use model.norm_impl: auto, modules or function")
        return "triton"
    if kind == "batch":
        return "modules"
    if setting == "auto":
        return "function" if target == "cpu" and (DYNAMO_TRACES_FUNCTIONS or not compiled) else "modules"
    return setting


@dataclass(frozen=True)
class NormSpec:
    """What every norm in one model is: kind, groups for ``group``, epsilon, whether proxy norm follows, and the
    implementation of its units (resolved, see :func:`resolve_norm_impl`)."""

    kind: NormKind = "batch"
    num_groups: int = 4
    eps: float = 1e-3
    proxy_norm: bool = False
    bn_momentum: float = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention
    impl: UnitImpl = "modules"

    def __post_init__(self) -> None:
        check_norm(self.kind, self.proxy_norm, self.impl)
        if self.kind == "batch" and self.impl != "modules":
            raise ValueError(f"BatchNorm units run as modules, not {self.impl} (see resolve_norm_impl)")


def norm_layer(spec: NormSpec, channels: int, affine: bool = True) -> nn.Module:
    if spec.kind == "batch":
        return nn.BatchNorm2d(channels, eps=spec.eps, momentum=spec.bn_momentum, affine=affine)
    groups = 1 if spec.kind == "layer" else spec.num_groups
    if channels % groups:
        raise ValueError(f"group norm with {groups} groups cannot split {channels} channels evenly")
    return nn.GroupNorm(groups, channels, eps=spec.eps, affine=affine)


class NormAct(nn.Module):
    """Norm then swish; with proxy norm, an affine-free norm then the proxy-normalised swish. As plain modules:
    one autograd node per op (``norm_impl: modules``, and every BatchNorm unit)."""

    def __init__(self, spec: NormSpec, channels: int, proxy_mode: ProxyMode = "full"):
        super().__init__()
        self.norm = norm_layer(spec, channels, affine=not spec.proxy_norm)
        self.act: nn.Module = ProxyNormActivation(channels, proxy_mode) if spec.proxy_norm else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compute(x, deferred=False)

    def forward_deferred(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Output and the per-channel scale still to apply (``None`` without proxy norm)."""
        if isinstance(self.act, ProxyNormActivation) and self.act.mode == "deferred_scale":
            return self._compute(x, deferred=True)
        return self(x), None

    def _compute(self, x: torch.Tensor, deferred: bool) -> Any:
        """``act(norm(x))``, or for a deferred-scale unit asked to defer, ``(centred, s)``."""
        if deferred:
            assert isinstance(self.act, ProxyNormActivation)
            return self.act.forward_deferred(self.norm(x))
        return self.act(self.norm(x))


class FunctionNormAct(NormAct):
    """The unit as one memory-lean autograd Function, on the modules' own parameters (models/norm_act.py)."""

    def _compute(self, x: torch.Tensor, deferred: bool) -> Any:
        norm, act = self.norm, self.act
        assert isinstance(norm, nn.GroupNorm)  # resolve_norm_impl() gives BatchNorm units the modules
        if isinstance(act, ProxyNormActivation):
            # Called as a plain forward, a deferred-scale unit only centres (as ProxyNormActivation.forward does).
            mode = "deferred_scale" if deferred else ("full" if act.mode == "full" else "center_only")
            return norm_proxy_swish(x, norm.num_groups, norm.eps, act.weight, act.bias, act.proxy_bias,
                                    act.proxy_weight, act.quantiles, act.eps, mode)
        return norm_swish(x, norm.num_groups, norm.eps, norm.weight, norm.bias)


class TritonNormAct(NormAct):
    """The unit as the fused Triton kernels (models/fused_norm.py; experimental, CUDA)."""

    def _compute(self, x: torch.Tensor, deferred: bool) -> Any:
        assert isinstance(self.norm, nn.GroupNorm)  # check_norm() refuses triton with BatchNorm
        return fused_norm_act(self.norm, self.act, x, deferred=deferred)


class ScaleOnlyNorm(nn.Module):
    """Affine-free norm times a per-channel scale, without shift (as plain modules).

    The projection conv of a proxy-normed block has no activation after it, so proxy norm does not apply; the
    reference implementation drops the norm's shift there instead.
    """

    def __init__(self, spec: NormSpec, channels: int):
        super().__init__()
        self.norm = norm_layer(spec, channels, affine=False)
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * channel_view(self.weight.to(x.dtype), x.dim())


class FunctionScaleOnlyNorm(ScaleOnlyNorm):
    """Group norm's own affine (weight, no bias): one op that saves x only, not the product's two inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.norm, nn.GroupNorm)
        return F.group_norm(x, self.norm.num_groups, kernel_param(self.weight, x), None, self.norm.eps)


class TritonScaleOnlyNorm(ScaleOnlyNorm):
    """The fused Triton kernels without the activation (experimental, CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.norm, nn.GroupNorm)
        return fused_scale_norm(self.norm, self.weight, x)


NORM_ACT: Dict[str, Type[NormAct]] = {"modules": NormAct, "function": FunctionNormAct, "triton": TritonNormAct}
SCALE_ONLY_NORM: Dict[str, Type[ScaleOnlyNorm]] = {
    "modules": ScaleOnlyNorm, "function": FunctionScaleOnlyNorm, "triton": TritonScaleOnlyNorm}


def norm_act(spec: NormSpec, channels: int, proxy_mode: ProxyMode = "full") -> NormAct:
    """The norm + activation unit of ``spec``'s implementation."""
    return NORM_ACT[spec.impl](spec, channels, proxy_mode)


def projection_norm(spec: NormSpec, channels: int) -> nn.Module:
    """The norm after a linear (no activation) projection conv."""
    return SCALE_ONLY_NORM[spec.impl](spec, channels) if spec.proxy_norm else norm_layer(spec, channels)


NORM_MODULES = (nn.BatchNorm2d, nn.GroupNorm, ScaleOnlyNorm, ProxyNormActivation)
