"""Proxy-Normalized Activation (Labatie et al. 2021, arXiv 2106.03743).

A batch-independent norm (LayerNorm/GroupNorm) removes per-sample statistics, but the channel-wise affine
transform plus the non-linearity that follow re-introduce a per-channel shift and scale that BatchNorm would
have removed. Proxy norm normalises the post-activation with the moments of a *proxy* variable
``Y ~ N(beta_tilde, (1 + gamma_tilde)^2)`` pushed through the same affine + activation, so it depends on the
parameters only — never on the other samples of the batch:

    z_c = (phi(gamma_c * y_c + beta_c) - m_c) * s_c
    m_c = E[phi(gamma_c * Y_c + beta_c)],   s_c = (Var[phi(gamma_c * Y_c + beta_c)] + eps_pn) ** -0.5

E and Var are computed by deterministic quadrature on ``num_points`` fixed standard-normal quantiles, in fp32,
with full autograd through the statistics (they are recomputed every forward, the cost is C x 200 elements).
"""

from __future__ import annotations

from typing import Literal, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ProxyMode = Literal["full", "deferred_scale", "center_only"]


def normal_quantiles(num_points: int) -> torch.Tensor:
    """Phi^-1((i + 1/2) / N), i = 0..N-1: equal-mass points of N(0, 1), computed in float64."""
    p = (torch.arange(num_points, dtype=torch.float64) + 0.5) / num_points
    return (2.0 ** 0.5) * torch.erfinv(2.0 * p - 1.0)


class ProxyNormActivation(nn.Module):
    """Affine + swish + proxy normalisation, per channel of an NCHW (or NHWC-strided) tensor.

    ``mode`` selects how much of the normalisation is applied here:
    - ``full``: ``(phi(.) - m) * s`` (after the stem, expand and head-less placements);
    - ``deferred_scale``: ``phi(.) - m``; the caller multiplies by ``s`` later (folded into the SE gate);
    - ``center_only``: ``phi(.) - m`` and ``s`` is dropped (the head: global pooling + FC follow, so a
      per-channel scale is absorbed by the classifier).
    """

    def __init__(self, channels: int, mode: ProxyMode = "full", eps: float = 0.03, num_points: int = 200):
        super().__init__()
        if mode not in ("full", "deferred_scale", "center_only"):
            raise ValueError(f"proxy norm mode {mode!r} is not one of full, deferred_scale, center_only")
        self.mode = mode
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))  # gamma
        self.bias = nn.Parameter(torch.zeros(channels))  # beta
        self.proxy_bias = nn.Parameter(torch.zeros(channels))  # beta tilde
        self.proxy_weight = nn.Parameter(torch.zeros(channels))  # gamma tilde: proxy std is 1 + gamma tilde
        self.register_buffer("quantiles", normal_quantiles(num_points).float(), persistent=False)

    def proxy_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean ``m`` and inverse std ``s`` of the activated proxy variable, in fp32."""
        q = self.quantiles.float()
        proxy = self.proxy_bias.float()[:, None] + (1.0 + self.proxy_weight.float())[:, None] * q[None, :]
        activated = F.silu(self.weight.float()[:, None] * proxy + self.bias.float()[:, None])
        mean = activated.mean(dim=1)
        var = (activated - mean[:, None]).square().mean(dim=1)
        return mean, torch.rsqrt(var + self.eps)

    def _centered(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        w, b = self.weight.to(x.dtype).view(shape), self.bias.to(x.dtype).view(shape)
        return F.silu(x * w + b) - mean.to(x.dtype).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self.proxy_stats()
        out = self._centered(x, mean)
        if self.mode == "full":
            out = out * inv_std.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))
        return out

    def forward_deferred(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(phi(.) - m, s)``: the caller applies ``s`` (for the SE gate fold)."""
        mean, inv_std = self.proxy_stats()
        return self._centered(x, mean), inv_std

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, mode={self.mode}, eps={self.eps}, points={self.quantiles.numel()}"
