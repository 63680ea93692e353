"""Mixup and the paper's fixed-lambda CutMix, with parameters drawn on the host.

The random draws happen on the host from a generator seeded by (seed, step), and travel to the device as a small
float tensor next to the batch. So the IPU graph needs no Beta sampler, and a resumed run mixes exactly as an
uninterrupted one would. The mixing itself runs in the model wrapper, on the device, on normalised images.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# Columns of a mix-parameter row: mixup weight of the sample itself, then the CutMix box as fractions.
MIX_COLUMNS = 5


def sample_mix(n: int, alpha: float, cutmix_lambda: Optional[float], generator: torch.Generator) -> torch.Tensor:
    """``[n, 5]``: mixup weight m (>= 0.5, partner = batch rolled by 1) and a CutMix box (y0, y1, x0, x1).

    Mixup (docs/paper.md, "Mixup and CutMix"): m ~ Beta(alpha, alpha), m <- max(m, 1 - m). CutMix ("v1"): with
    probability 1.55*lambda - 0.96 no cut; otherwise an area 1 - lambda' with lambda' = 1 + ln(u)/4,
    u ~ U(e^-4, 1), of the image's aspect, one box for the whole micro-batch, partner = batch rolled by 2.
    An empty box means no cut.
    """
    params = torch.zeros(n, MIX_COLUMNS)
    params[:, 0] = 1.0
    if alpha > 0:
        a, b = _gamma(alpha, n, generator), _gamma(alpha, n, generator)
        m = a / (a + b)
        params[:, 0] = torch.maximum(m, 1 - m)
    if cutmix_lambda is not None:
        skip = torch.rand((), generator=generator).item() < 1.55 * cutmix_lambda - 0.96
        if not skip:
            u = math.exp(-4) + (1 - math.exp(-4)) * torch.rand((), generator=generator).item()
            side = math.sqrt(max(0.0, -math.log(u) / 4))  # sqrt of the cut area 1 - lambda'
            cy, cx = torch.rand(2, generator=generator).tolist()
            y0, x0 = max(0.0, cy - side / 2), max(0.0, cx - side / 2)
            params[:, 1:] = torch.tensor([y0, min(1.0, y0 + side), x0, min(1.0, x0 + side)])
    return params


def _gamma(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) samples from a seeded generator (torch.distributions cannot take one)."""
    # Marsaglia-Tsang for alpha >= 1; boost small alpha with U^(1/alpha).
    boost = alpha < 1
    a = alpha + 1 if boost else alpha
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(n)
    filled = 0
    while filled < n:
        x = torch.randn(n, generator=generator)
        v = (1 + c * x) ** 3
        u = torch.rand(n, generator=generator)
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * x ** 2 + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = (d * v)[ok][: n - filled]
        out[filled:filled + take.numel()] = take
        filled += take.numel()
    if boost:
        out = out * torch.rand(n, generator=generator) ** (1 / alpha)
    return out


def apply_mix(images: torch.Tensor, targets: torch.Tensor, params: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mix normalised images ``[N, C, H, W]`` and soft targets ``[N, K]`` with rows from :func:`sample_mix`."""
    m = params[:, 0].to(images.dtype)
    images = m.view(-1, 1, 1, 1) * images + (1 - m).view(-1, 1, 1, 1) * images.roll(1, 0)
    targets = m.view(-1, 1).to(targets.dtype) * targets + (1 - m).view(-1, 1).to(targets.dtype) * targets.roll(1, 0)
    h, w = images.shape[-2:]
    ys = (torch.arange(h, device=images.device, dtype=params.dtype) + 0.5) / h
    xs = (torch.arange(w, device=images.device, dtype=params.dtype) + 0.5) / w
    inside_y = (ys[None, :] >= params[:, 1:2]) & (ys[None, :] < params[:, 2:3])
    inside_x = (xs[None, :] >= params[:, 3:4]) & (xs[None, :] < params[:, 4:5])
    box = (inside_y[:, :, None] & inside_x[:, None, :]).to(images.dtype)  # [N, H, W]
    area = box.mean((1, 2)).to(targets.dtype)
    images = images * (1 - box[:, None]) + images.roll(2, 0) * box[:, None]
    targets = (1 - area)[:, None] * targets + area[:, None] * targets.roll(2, 0)
    return images, targets
