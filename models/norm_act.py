"""Memory-lean autograd Functions for the norm units: group/layer norm + affine + swish [+ proxy norm].

As plain modules, a proxy-normed unit is ``GroupNorm -> *gamma -> +beta -> silu -> -m -> *s``: six autograd nodes,
each reading and writing (and on a CPU, freshly allocating) a full activation, most of them saving one for the
backward. :func:`norm_proxy_swish` (and :func:`norm_swish`, the unit without proxy norm) computes the same as one
``torch.autograd.Function``; docs/performance.md derives the backward and gives the measurements:

- forward: ``native_group_norm`` with gamma/beta as its affine (a statistics pass and an apply pass), swish in
  place, the proxy centre (and scale) in place with one ``sub_``/``addcmul``; the proxy moments m, s (C x 200
  points) are computed inside from gamma, beta, beta~, gamma~;
- saved: the input and the per-(sample, group) mean/rstd, plus, in ``full`` mode only, the output (which the
  next conv saves anyway). The swish input is recomputed in the backward (one pass);
- backward: ``silu_backward`` of the recomputed swish input (in place), then ``native_group_norm_backward``
  (dx and the per-channel sums in one fused kernel); the per-channel sums of the incoming gradient that m and s
  need come from one fused reduction (batch norm's weight/bias gradient kernel); the moments' own backward to
  gamma, beta, beta~, gamma~ is :func:`models.proxy_norm.proxy_moments_backward`.

Per-channel and per-group reductions accumulate in fp32 whatever the activation dtype; the output keeps x's dtype
and memory format; autocast is off inside (the dtypes are chosen here). ``torch.compile`` traces the Function,
forward and backward, without a graph break on torch >= 2.1; torch 2.0 cannot (``auto`` then runs the modules).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from .layout import channel_view, dense
from .proxy_norm import PROXY_MODES, accumulation_dtype, proxy_moments, proxy_moments_backward

#: torch 2.0's dynamo refuses an autograd.Function whose inputs require grad ("autograd.Function with
#: requires_grad": a graph break at every unit); later versions trace its forward and backward.
DYNAMO_TRACES_FUNCTIONS = torch.__version__ >= "2.1"  # a TorchVersion: compared as versions, not strings

_aten = torch.ops.aten


def kernel_param(p: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """A per-channel tensor as the norm kernels take it next to ``x``: as it is (fp32) on CPU, whose kernels
    accept a low-precision x with fp32 parameters; in x's dtype elsewhere (CUDA's group norm wants one dtype)."""
    if p is None or x.device.type == "cpu":
        return p
    return p.to(x.dtype)


def _sizes(x: torch.Tensor) -> Tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // max(n * c, 1)


def _channel_dot_and_sum(grad: torch.Tensor, out: torch.Tensor, inv_s: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per channel (sums over every dim but 1), in ``inv_s``' dtype: ``sum(grad * out) * inv_s`` and ``sum(grad)``,
    from one fused read of both tensors (batch norm's weight and bias gradients at mean 0, inverse std ``inv_s``)."""
    _, dot, total = _aten.native_batch_norm_backward(grad, out, None, None, None, torch.zeros_like(inv_s), inv_s,
                                                     True, 0.0, [False, True, True])
    return dot.to(inv_s.dtype), total.to(inv_s.dtype)


class _NormSwish(torch.autograd.Function):
    """``a = group_norm(x) * gamma + beta; phi = swish(a)``, then per ``mode``: ``phi`` (None), ``(phi - m) s``
    (full), ``phi - m`` and ``s`` (deferred_scale), ``phi - m`` (center_only)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                proxy_beta: Optional[torch.Tensor], proxy_gamma: Optional[torch.Tensor],
                quantiles: Optional[torch.Tensor], groups: int, eps: float, proxy_eps: float,
                mode: Optional[str]) -> Any:
        # CPU's native group norm takes NCHW or channels_last; CUDA's only NCHW-contiguous input.
        x = dense(x) if x.device.type == "cpu" else x.contiguous()
        n, c, hw = _sizes(x)
        s = None
        with torch.autocast(x.device.type, enabled=False):
            out, mean, rstd = _aten.native_group_norm(x, kernel_param(gamma, x), kernel_param(beta, x), n, c, hw,
                                                      groups, eps)
            out = F.silu(out, inplace=True)
            if mode is not None:
                assert gamma is not None and beta is not None and proxy_beta is not None
                assert proxy_gamma is not None and quantiles is not None
                m, s, _ = proxy_moments(gamma, beta, proxy_beta, proxy_gamma, quantiles, proxy_eps)
                if mode == "full":
                    out = torch.addcmul(channel_view((-m * s).to(x.dtype), x.dim()), out,
                                        channel_view(s.to(x.dtype), x.dim()), out=out)
                else:
                    out = out.sub_(channel_view(m.to(x.dtype), x.dim()))
        ctx.groups, ctx.proxy_eps, ctx.mode = groups, proxy_eps, mode
        ctx.save_for_backward(x, mean, rstd, gamma, beta, proxy_beta, proxy_gamma, quantiles,
                              out if mode == "full" else None)
        return (out, s) if mode == "deferred_scale" else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, grad_s: Optional[torch.Tensor] = None) -> Any:
        x, mean, rstd, gamma, beta, proxy_beta, proxy_gamma, quantiles, out = ctx.saved_tensors
        mode, groups = ctx.mode, ctx.groups
        n, c, hw = _sizes(x)
        need_x = ctx.needs_input_grad[0]
        need_params = any(ctx.needs_input_grad[1:5])
        with torch.autocast(x.device.type, enabled=False):
            # The swish input again, a = x * (rstd gamma) + (beta - mean rstd gamma) per (sample, channel): one pass.
            acc, per_group = accumulation_dtype(x), (n, groups, 1)
            scale = rstd.to(acc).view(per_group).expand(n, groups, c // groups).reshape(n, c)
            if gamma is not None:
                scale = scale * gamma.to(acc)
            shift = -mean.to(acc).view(per_group).expand(n, groups, c // groups).reshape(n, c) * scale
            if beta is not None:
                shift = shift + beta.to(acc)
            act_in = torch.addcmul(channel_view(shift.to(x.dtype), x.dim()), x,
                                   channel_view(scale.to(x.dtype), x.dim()), out=torch.empty_like(x))
            # The norm's backward sees d(loss)/da through ``weight``: gamma, or gamma * s when s scales the output.
            weight = gamma
            if mode is not None:
                assert gamma is not None and beta is not None and proxy_beta is not None
                assert proxy_gamma is not None and quantiles is not None
                m, s, u = proxy_moments(gamma, beta, proxy_beta, proxy_gamma, quantiles, ctx.proxy_eps)
                if mode == "full":
                    weight = gamma * s.to(gamma.dtype)
                if need_params:
                    if mode == "full":  # out = (phi - m) s:  dm = -s sum(g),  ds = sum(g (phi - m)) = sum(g out) / s
                        ds, total = _channel_dot_and_sum(grad, out, s.reciprocal())
                        dm = -s * total
                    else:  # out = phi - m:  dm = -sum(g);  s leaves as an output (deferred) or not at all
                        dm = -grad.sum([d for d in range(grad.dim()) if d != 1], dtype=s.dtype)
                        ds = grad_s.to(s.dtype) if grad_s is not None else torch.zeros_like(s)
            d_act = _aten.silu_backward.grad_input(grad, act_in, grad_input=act_in)
            dx, dgamma, dbeta = _aten.native_group_norm_backward(
                d_act, x, mean, rstd, kernel_param(weight, x), n, c, hw, groups,
                [need_x, need_params and gamma is not None, need_params and beta is not None])
            d_proxy_beta = d_proxy_gamma = None
            if mode is not None and need_params:
                if mode == "full":  # the norm's sums lack the factor s its weight carried into dx
                    dgamma, dbeta = dgamma.to(s.dtype) * s, dbeta.to(s.dtype) * s
                pg, pb, d_proxy_beta, d_proxy_gamma = proxy_moments_backward(dm, ds, gamma, proxy_beta, proxy_gamma,
                                                                             quantiles, m, s, u)
                dgamma, dbeta = dgamma.to(s.dtype) + pg, dbeta.to(s.dtype) + pb
        grads = [dx, dgamma, dbeta, d_proxy_beta, d_proxy_gamma]
        inputs = [x, gamma, beta, proxy_beta, proxy_gamma]
        return tuple(g.to(t.dtype) if g is not None and need else None
                     for g, t, need in zip(grads, inputs, ctx.needs_input_grad)) + (None,) * 5


def norm_swish(x: torch.Tensor, groups: int, eps: float, gamma: Optional[torch.Tensor],
               beta: Optional[torch.Tensor]) -> torch.Tensor:
    """``swish(group_norm(x) * gamma + beta)``, what ``SiLU(GroupNorm(x))`` computes, saving x only."""
    return _NormSwish.apply(x, gamma, beta, None, None, None, groups, eps, 0.0, None)


def norm_proxy_swish(x: torch.Tensor, groups: int, eps: float, gamma: torch.Tensor, beta: torch.Tensor,
                     proxy_beta: torch.Tensor, proxy_gamma: torch.Tensor, quantiles: torch.Tensor,
                     proxy_eps: float, mode: str) -> Any:
    """``ProxyNormActivation(mode)(group_norm(x))`` (affine-free norm) as one Function: the output, or for
    ``deferred_scale`` ``(phi - m, s)`` with ``s`` per channel in fp32 and differentiable (it goes into the SE gate)."""
    if mode not in PROXY_MODES:
        raise ValueError(f"proxy norm mode {mode!r} is not one of {', '.join(PROXY_MODES)}")
    return _NormSwish.apply(x, gamma, beta, proxy_beta, proxy_gamma, quantiles, groups, eps, proxy_eps, mode)
