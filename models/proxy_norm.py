"""Proxy-Normalized Activation (Labatie et al. 2021, arXiv 2106.03743).

A batch-independent norm (LayerNorm/GroupNorm) removes per-sample statistics, but the channel-wise affine
transform plus the non-linearity that follow re-introduce a per-channel shift and scale that BatchNorm would
have removed. Proxy norm normalises the post-activation with the moments of a *proxy* variable
``Y ~ N(beta_tilde, (1 + gamma_tilde)^2)`` pushed through the same affine + activation, so it depends on the
parameters only — never on the other samples of the batch:

    z_c = (phi(gamma_c * y_c + beta_c) - m_c) * s_c
    m_c = E[phi(gamma_c * Y_c + beta_c)],   s_c = (Var[phi(gamma_c * Y_c + beta_c)] + eps_pn) ** -0.5

E and Var are computed by deterministic quadrature on ``num_points`` fixed standard-normal quantiles, in fp32,
and recomputed every forward (the cost is C x 200 elements): here with autograd through the statistics; the fused
unit of models/norm_act.py calls :func:`proxy_moments_backward`, their gradient written out.
"""

from __future__ import annotations

from typing import Literal, Tuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .layout import channel_view

ProxyMode = Literal["full", "deferred_scale", "center_only"]
PROXY_MODES = get_args(ProxyMode)


def normal_quantiles(num_points: int) -> torch.Tensor:
    """Phi^-1((i + 1/2) / N), i = 0..N-1: equal-mass points of N(0, 1), computed in float64."""
    p = (torch.arange(num_points, dtype=torch.float64) + 0.5) / num_points
    return (2.0 ** 0.5) * torch.erfinv(2.0 * p - 1.0)


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the moments are computed in: fp32, or fp64 for fp64 parameters (so gradcheck sees exact maths)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def proxy_moments(gamma: torch.Tensor, beta: torch.Tensor, proxy_beta: torch.Tensor, proxy_gamma: torch.Tensor,
                  quantiles: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, s, u)``: the mean and inverse std of ``swish(u)`` over the points ``u = gamma * Y + beta`` of the
    proxy ``Y = beta~ + (1 + gamma~) q`` at the quantiles ``q``, and ``u`` itself (channels x points).

    ``u = gamma (1 + gamma~) q + (gamma beta~ + beta)`` is one broadcast multiply-add. Every op here is
    elementwise or a reduction, which autocast leaves in the input's dtype; ``torch.addr`` would be cast to
    fp16/bf16 by CUDA's autocast, and the moments would no longer be fp32.
    """
    acc = accumulation_dtype(gamma)
    gamma, beta = gamma.to(acc), beta.to(acc)
    u = torch.addcmul((gamma * proxy_beta.to(acc) + beta)[:, None], (gamma * (1.0 + proxy_gamma.to(acc)))[:, None],
                      quantiles.to(acc)[None, :])
    activated = F.silu(u)
    mean = activated.mean(dim=1)
    var = (activated - mean[:, None]).square().mean(dim=1)
    return mean, torch.rsqrt(var + eps), u


def proxy_moments_backward(dm: torch.Tensor, ds: torch.Tensor, gamma: torch.Tensor, proxy_beta: torch.Tensor,
                           proxy_gamma: torch.Tensor, quantiles: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                           u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients w.r.t. gamma, beta, beta~, gamma~ of a loss that sees the moments only, from ``dm = dL/dm``
    and ``ds = dL/ds`` and :func:`proxy_moments`' ``m, s, u`` (docs/performance.md derives them).

    With N points and ``v = swish(u)``: ``dL/dv = dm / N + dvar * 2 (v - m) / N`` with ``dvar = -ds s^3 / 2`` (the
    variance's own dependence on m drops out: the deviations sum to zero) and ``du = dL/dv * swish'(u)``. Since
    ``du/dgamma = Y``, ``du/dbeta = 1``, ``du/dbeta~ = gamma``, ``du/dgamma~ = gamma q``, two sums over the points,
    ``S0 = sum du`` and ``S1 = sum du q``, give all four: ``(beta~ S0 + (1 + gamma~) S1, S0, gamma S0, gamma S1)``.
    """
    n, acc = u.shape[1], u.dtype
    q = quantiles.to(acc)
    coef = (-1.0 / n) * ds * s.pow(3)  # 2 dvar / N
    dv = torch.addcmul((dm / n)[:, None], F.silu(u) - m[:, None], coef[:, None])
    du = torch.ops.aten.silu_backward(dv, u)
    s0, s1 = (du @ torch.stack([torch.ones_like(q), q], dim=1)).unbind(1)
    gamma, pb, pg = gamma.to(acc), proxy_beta.to(acc), proxy_gamma.to(acc)
    return pb * s0 + (1.0 + pg) * s1, s0, gamma * s0, gamma * s1


class ProxyNormActivation(nn.Module):
    """Affine + swish + proxy normalisation, per channel of an NCHW (or NHWC-strided) tensor.

    ``mode`` selects how much of the normalisation is applied here:
    - ``full``: ``(phi(.) - m) * s`` (after the stem, expand and head-less placements);
    - ``deferred_scale``: ``phi(.) - m``; the caller multiplies by ``s`` later (folded into the SE gate);
    - ``center_only``: ``phi(.) - m`` and ``s`` is dropped (the head: global pooling + FC follow, so a
      per-channel scale is absorbed by the classifier).
    """

    quantiles: torch.Tensor

    def __init__(self, channels: int, mode: ProxyMode = "full", eps: float = 0.03, num_points: int = 200):
        super().__init__()
        if mode not in PROXY_MODES:
            raise ValueError(f"proxy norm mode {mode!r} is not one of {', '.join(PROXY_MODES)}")
        self.mode = mode
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))  # gamma
        self.bias = nn.Parameter(torch.zeros(channels))  # beta
        self.proxy_bias = nn.Parameter(torch.zeros(channels))  # beta tilde
        self.proxy_weight = nn.Parameter(torch.zeros(channels))  # gamma tilde: proxy std is 1 + gamma tilde
        self.register_buffer("quantiles", normal_quantiles(num_points).float(), persistent=False)

    def proxy_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean ``m`` and inverse std ``s`` of the activated proxy variable, in fp32."""
        m, s, _ = proxy_moments(self.weight, self.bias, self.proxy_bias, self.proxy_weight, self.quantiles, self.eps)
        return m, s

    def _centered(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        w, b = channel_view(self.weight.to(x.dtype), x.dim()), channel_view(self.bias.to(x.dtype), x.dim())
        return F.silu(x * w + b) - channel_view(mean.to(x.dtype), x.dim())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self.proxy_stats()
        out = self._centered(x, mean)
        if self.mode == "full":
            out = out * channel_view(inv_std.to(x.dtype), x.dim())
        return out

    def forward_deferred(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(phi(.) - m, s)``: the caller applies ``s`` (for the SE gate fold)."""
        mean, inv_std = self.proxy_stats()
        return self._centered(x, mean), inv_std

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, mode={self.mode}, eps={self.eps}, points={self.quantiles.numel()}"
