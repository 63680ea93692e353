"""How per-channel tensors line up with activations, and which activation layouts the norm kernels take."""

from __future__ import annotations

import torch


def channel_view(v: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """A per-channel ``(C,)`` tensor as ``(1, C, 1, ...)``, or a per-sample ``(N, C)`` one as ``(N, C, 1, ...)``:
    broadcastable against an ``ndim``-dimensional ``(N, C, ...)`` activation."""
    return v.view(v.shape[0] if v.dim() == 2 else 1, v.shape[-1], *(1,) * (ndim - 2))


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is NCHW- or channels_last-contiguous, else an NCHW-contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()
