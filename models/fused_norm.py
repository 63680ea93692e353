"""Fused batch-independent norm + affine + swish + proxy norm, in Triton, with a fused backward.

One kernel family covers every norm unit of the network when its norm is ``group`` or ``layer`` (GroupNorm with
one group) — what :class:`models.norms.NormAct` and :class:`models.norms.ScaleOnlyNorm` compute in plain PyTorch::

    y   = (x - mu_bg) * rstd_bg               per sample b and group g, statistics over (C/G, H, W), in fp32
    a   = gamma_c * y + beta_c                norm affine (no PN) or the PN's gamma/beta (PN); gamma only: ScaleOnlyNorm
    phi = a * sigmoid(a)                      swish (absent for ScaleOnlyNorm)
    out = (phi - m_c) * s_c                   proxy norm; m, s come in as tensors (``s`` absent: deferred / centre only)

The proxy statistics ``m, s`` stay in PyTorch (:meth:`ProxyNormActivation.proxy_stats`: C x 200 elements); the
kernels take them as inputs and return their gradients, and autograd carries those on into gamma, beta, beta~ and
gamma~. So every implementation shares one set of parameters and state-dict keys. The kernels run only where a model
was built with ``model.norm_impl: triton`` (:class:`models.norms.TritonNormAct`); ``auto`` never picks them until
they have passed their tests on a real GPU and won there: so far they have run only in Triton's interpreter.

Kernels (x viewed as (B, C, HW) with strides; NCHW and NHWC/channels_last alike, any float dtype, fp32 maths):

- forward, 2 launches: ``_stats_kernel`` — grid (B*G, chunks); each program reads one chunk of a sample's group
  (a 2-D block of channels x positions, ~32k elements: a B0 stage-2 sample of 96x80x80 = 614k elements is split
  over ~20 programs) with a Welford update per lane, merges its lanes with Chan's formula and writes
  (count, mean, M2): one read of x, no E[x^2] - E[x]^2 cancellation, deterministic (no atomics). ``_fwd_kernel``
  — same grid; each program merges its group's chunk partials (a few dozen floats, redundantly per program: no
  extra launch) into mean/rstd, then reads x once and writes out once. Total: 2 reads + 1 write.
- backward, 2 launches: ``_bwd_reduce_kernel`` recomputes y, a, phi from x and the saved mean/rstd and writes
  per-channel partial sums (dgamma, dbeta, dm, ds) of its chunk; the group sums sum(dy), sum(dy*y) follow from
  them (sum_c gamma_c * ...) per chunk. ``_bwd_dx_kernel`` merges its group's chunk sums and applies
  ``dx = rstd * (dy - mean(dy) - y * mean(dy*y))``. Total: 2 x (read x + read grad) + 1 write. The per-channel
  partials (B x hw-chunks x C fp32, ~1% of the traffic) are summed by one ``torch.sum``.
- Tiles: power-of-two [channels, positions] blocks (2048 lanes, 8 warps), the wide side along the contiguous
  dim; a program spans the whole contiguous extent of its group (NHWC: all its channels; NCHW: all positions)
  and a run of the other. No host sync anywhere (CUDA-graph safe).

Backward formulas (g = dL/dout; sums over (b, h, w) for the per-channel ones)::

    ds_c     = sum g * (phi - m)               dphi = g * s   (s = 1 when absent)
    dm_c     = -sum dphi
    da       = dphi * sigmoid(a) * (1 + a * (1 - sigmoid(a)))
    dbeta_c  = sum da,  dgamma_c = sum da * y,  dy = da * gamma
    dx       = rstd * (dy - mean_g(dy) - y * mean_g(dy * y))     (means over the sample's group)

Triton is imported here, guarded: without it (Poplar SDK env, CPU-only installs) this module still imports and
:func:`triton_error` says why the kernels cannot run. ``TRITON_INTERPRET=1`` (set before
Triton is imported) runs the kernels in Triton's CPU interpreter, on CPU tensors: that is how the tests check them
without a GPU; ``norm_impl: triton`` accepts CPU tensors then.

torch.compile: ``triton`` runs each fused unit eagerly behind a graph break. Registering the kernels as
``torch.library`` custom ops (compile + CUDA graphs without breaks) is left for later.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .layout import dense
from .proxy_norm import ProxyNormActivation

MIN_TRITON = (3, 0)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:  # guarded: the SDK 3.4 env has no usable Triton, CPU-only installs may have none
    import triton
    import triton.language as tl

    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"


def _version_tuple(version: str) -> Tuple[int, ...]:
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


if triton is not None and _version_tuple(triton.__version__) < MIN_TRITON:
    _TRITON_ERROR = (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, "
                     "which the fused norm kernels need")


def triton_error() -> Optional[str]:
    """Why the kernels cannot be used at all here (``None`` when Triton is importable and recent enough)."""
    return _TRITON_ERROR


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason(x: torch.Tensor) -> Optional[str]:
    """``None`` when the fused kernels can run on ``x``, else why not."""
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if x.dim() != 4:
        return f"the input has {x.dim()} dims, the kernels take NCHW/NHWC 4-d activations"
    if x.dtype not in _DTYPES:
        return f"the input dtype is {x.dtype}, the kernels take float32, float16 and bfloat16"
    if not x.is_cuda and not interpreter_enabled():
        return (f"the input is on {x.device.type}, not a CUDA device (the kernels are Triton GPU kernels; "
                "TRITON_INTERPRET=1 runs them in Triton's CPU interpreter, for tests only)")
    return None


def device_error(device: str) -> Optional[str]:
    """Why a model built for ``device`` (cpu, cuda, ipu) cannot run the kernels, or ``None``."""
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if device != "cuda" and not (device == "cpu" and interpreter_enabled()):
        return (f"the model is built for {device}, not a CUDA device (the kernels are Triton GPU kernels; "
                "TRITON_INTERPRET=1 runs them in Triton's CPU interpreter, for tests only)")
    return None


def _check_input(x: torch.Tensor) -> None:
    reason = unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f"model.norm_impl: triton, but the fused Triton norm kernels cannot run: {reason}; "
                           "build the model with model.norm_impl: auto, modules or function")


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------

if _TRITON_ERROR is None:

    @triton.jit
    def _chunk_bounds(pid_k, n_hw_chunks, Cg, HW, CHUNK_C, CHUNK_HW):
        cc = pid_k // n_hw_chunks
        hc = pid_k % n_hw_chunks
        c_start = cc * CHUNK_C
        hw_start = hc * CHUNK_HW
        c_end = tl.minimum(c_start + CHUNK_C, Cg)
        hw_end = tl.minimum(hw_start + CHUNK_HW, HW)
        return hc, c_start, c_end, hw_start, hw_end

    @triton.jit
    def _stats_kernel(X, PART, sxb, sxc, sxhw, G, Cg, HW, CHUNK_C, CHUNK_HW, n_hw_chunks, n_chunks,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """Partial (count, mean, M2) of one chunk of one (sample, group): PART[bg, k, 0:3].

        Welford per lane over the program's tiles (no cross-thread reduction per tile), then Chan's merge of
        the lanes: stable at any chunk size, one read of x.
        """
        pid_bg = tl.program_id(0)
        pid_k = tl.program_id(1)
        b = pid_bg // G
        g = pid_bg % G
        hc, c_start, c_end, hw_start, hw_end = _chunk_bounds(pid_k, n_hw_chunks, Cg, HW, CHUNK_C, CHUNK_HW)
        base = X + b.to(tl.int64) * sxb + (g * Cg).to(tl.int64) * sxc
        count = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        mean = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        m2 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        for c0 in range(c_start, c_end, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < c_end
            for hw0 in range(hw_start, hw_end, BLOCK_HW):
                offs_hw = hw0 + tl.arange(0, BLOCK_HW)
                mask = mask_c[:, None] & (offs_hw < hw_end)[None, :]
                x = tl.load(base + offs_c[:, None] * sxc + offs_hw[None, :] * sxhw, mask=mask, other=0.0)
                x = x.to(tl.float32)
                new_count = count + mask.to(tl.float32)
                delta = tl.where(mask, x - mean, 0.0)
                mean = mean + delta / tl.maximum(new_count, 1.0)
                m2 = m2 + delta * (x - mean)  # delta = 0 where masked
                count = new_count
        n = tl.sum(tl.sum(count, axis=1), axis=0)
        mu = tl.sum(tl.sum(count * mean, axis=1), axis=0) / n
        dev = mean - mu
        total_m2 = tl.sum(tl.sum(m2 + count * dev * dev, axis=1), axis=0)
        out = PART + (pid_bg * n_chunks + pid_k) * 3
        tl.store(out, n)
        tl.store(out + 1, mu)
        tl.store(out + 2, total_m2)

    @triton.jit
    def _group_stats(PART, pid_bg, n_chunks, eps, BLOCK_P: tl.constexpr):
        """Combine a group's chunk partials into (mean, rstd)."""
        p = tl.arange(0, BLOCK_P)
        mask = p < n_chunks
        row = PART + pid_bg * n_chunks * 3 + p * 3
        cnt = tl.load(row, mask=mask, other=0.0)
        mu = tl.load(row + 1, mask=mask, other=0.0)
        m2 = tl.load(row + 2, mask=mask, other=0.0)
        n = tl.sum(cnt, axis=0)
        mean = tl.sum(cnt * mu, axis=0) / n
        dev = mu - mean
        var = (tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)) / n
        return mean, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _affine(W, B, ch, mask_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-channel (gamma, beta) of a channel tile in fp32; 1 and 0 where the unit has none."""
        if HAS_W:
            w = tl.load(W + ch, mask=mask_c, other=0.0).to(tl.float32)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_B:
            bias = tl.load(B + ch, mask=mask_c, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_C], tl.float32)
        return w, bias

    @triton.jit
    def _fwd_kernel(X, Y, PART, MEAN, RSTD, W, B, M, S,
                    sxb, sxc, sxhw, syb, syc, syhw, G, Cg, HW, CHUNK_C, CHUNK_HW, n_hw_chunks, n_chunks, eps,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_M: tl.constexpr, HAS_S: tl.constexpr,
                    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_P: tl.constexpr):
        pid_bg = tl.program_id(0)
        pid_k = tl.program_id(1)
        b = pid_bg // G
        g = pid_bg % G
        hc, c_start, c_end, hw_start, hw_end = _chunk_bounds(pid_k, n_hw_chunks, Cg, HW, CHUNK_C, CHUNK_HW)
        mean, rstd = _group_stats(PART, pid_bg, n_chunks, eps, BLOCK_P)
        if pid_k == 0:
            tl.store(MEAN + pid_bg, mean)
            tl.store(RSTD + pid_bg, rstd)
        xbase = X + b.to(tl.int64) * sxb + (g * Cg).to(tl.int64) * sxc
        ybase = Y + b.to(tl.int64) * syb + (g * Cg).to(tl.int64) * syc
        for c0 in range(c_start, c_end, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < c_end
            ch = g * Cg + offs_c
            w, bias = _affine(W, B, ch, mask_c, HAS_W, HAS_B, BLOCK_C)
            # a = (x - mean) * rstd * w + bias = x * scale + shift
            scale = (w * rstd)[:, None]
            shift = (bias - mean * rstd * w)[:, None]
            if HAS_M:
                m = tl.load(M + ch, mask=mask_c, other=0.0).to(tl.float32)[:, None]
            if HAS_S:
                s = tl.load(S + ch, mask=mask_c, other=0.0).to(tl.float32)[:, None]
            for hw0 in range(hw_start, hw_end, BLOCK_HW):
                offs_hw = hw0 + tl.arange(0, BLOCK_HW)
                mask = mask_c[:, None] & (offs_hw < hw_end)[None, :]
                x = tl.load(xbase + offs_c[:, None] * sxc + offs_hw[None, :] * sxhw, mask=mask, other=0.0)
                a = x.to(tl.float32) * scale + shift
                if ACT:
                    a = a * tl.sigmoid(a)
                if HAS_M:
                    a = a - m
                if HAS_S:
                    a = a * s
                tl.store(ybase + offs_c[:, None] * syc + offs_hw[None, :] * syhw, a.to(Y.dtype.element_ty),
                         mask=mask)

    @triton.jit
    def _bwd_reduce_kernel(X, DO, MEAN, RSTD, W, B, M, S, GPART, CPART,
                           sxb, sxc, sxhw, sgb, sgc, sghw, C, G, Cg, HW, CHUNK_C, CHUNK_HW, n_hw_chunks, n_chunks,
                           cpart_stride,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_M: tl.constexpr, HAS_S: tl.constexpr,
                           ACT: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, NEED_M: tl.constexpr,
                           NEED_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """Per group: sum(dy), sum(dy*y) -> GPART[bg, k, 0:2]; per channel partials -> CPART[q, b*n_hw_chunks+hc, c]
        with q = 0: dgamma, 1: dbeta, 2: sum(dphi) (dm = -that), 3: ds."""
        pid_bg = tl.program_id(0)
        pid_k = tl.program_id(1)
        b = pid_bg // G
        g = pid_bg % G
        hc, c_start, c_end, hw_start, hw_end = _chunk_bounds(pid_k, n_hw_chunks, Cg, HW, CHUNK_C, CHUNK_HW)
        mean = tl.load(MEAN + pid_bg)
        rstd = tl.load(RSTD + pid_bg)
        xbase = X + b.to(tl.int64) * sxb + (g * Cg).to(tl.int64) * sxc
        gbase = DO + b.to(tl.int64) * sgb + (g * Cg).to(tl.int64) * sgc
        crow = CPART + (b * n_hw_chunks + hc).to(tl.int64) * C
        sum_dy = 0.0
        sum_dyy = 0.0
        for c0 in range(c_start, c_end, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < c_end
            ch = g * Cg + offs_c
            w, bias = _affine(W, B, ch, mask_c, HAS_W, HAS_B, BLOCK_C)
            if HAS_M:
                m = tl.load(M + ch, mask=mask_c, other=0.0).to(tl.float32)[:, None]
            if HAS_S:
                s_c = tl.load(S + ch, mask=mask_c, other=0.0).to(tl.float32)
                s = s_c[:, None]
            # Element-wise accumulators over the positions, reduced once per channel block. The group sums
            # follow from the per-channel ones: sum(dy) = sum_c w_c sum(da), sum(dy*y) = sum_c w_c sum(da*y).
            acc_w = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)  # da * y
            acc_b = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)  # da
            acc_g = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)  # grad (dm = -s * sum(grad))
            acc_s = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)  # grad * (phi - m)
            for hw0 in range(hw_start, hw_end, BLOCK_HW):
                offs_hw = hw0 + tl.arange(0, BLOCK_HW)
                mask = mask_c[:, None] & (offs_hw < hw_end)[None, :]
                x = tl.load(xbase + offs_c[:, None] * sxc + offs_hw[None, :] * sxhw, mask=mask, other=0.0)
                go = tl.load(gbase + offs_c[:, None] * sgc + offs_hw[None, :] * sghw, mask=mask, other=0.0)
                go = go.to(tl.float32)  # 0 where masked: every product below vanishes there
                y = (x.to(tl.float32) - mean) * rstd
                a = y * w[:, None] + bias[:, None]
                if ACT:
                    sig = tl.sigmoid(a)
                    phi = a * sig
                else:
                    phi = a
                if NEED_S:
                    if HAS_M:
                        acc_s += go * (phi - m)
                    else:
                        acc_s += go * phi
                if NEED_M:
                    acc_g += go
                if HAS_S:
                    dphi = go * s
                else:
                    dphi = go
                if ACT:
                    da = dphi * (sig * (1.0 + a * (1.0 - sig)))
                else:
                    da = dphi
                acc_b += da
                acc_w += da * y
            sum_b = tl.sum(acc_b, axis=1)
            sum_w = tl.sum(acc_w, axis=1)
            sum_dy += tl.sum(sum_b * w, axis=0)
            sum_dyy += tl.sum(sum_w * w, axis=0)
            if NEED_W:
                tl.store(crow + ch, sum_w, mask=mask_c)
            if NEED_B:
                tl.store(crow + cpart_stride + ch, sum_b, mask=mask_c)
            if NEED_M:
                if HAS_S:
                    tl.store(crow + 2 * cpart_stride + ch, tl.sum(acc_g, axis=1) * s_c, mask=mask_c)
                else:
                    tl.store(crow + 2 * cpart_stride + ch, tl.sum(acc_g, axis=1), mask=mask_c)
            if NEED_S:
                tl.store(crow + 3 * cpart_stride + ch, tl.sum(acc_s, axis=1), mask=mask_c)
        out = GPART + (pid_bg * n_chunks + pid_k) * 2
        tl.store(out, sum_dy)
        tl.store(out + 1, sum_dyy)

    @triton.jit
    def _bwd_dx_kernel(X, DO, DX, MEAN, RSTD, W, B, M, S, GPART,
                       sxb, sxc, sxhw, sgb, sgc, sghw, sdb, sdc, sdhw, G, Cg, HW, CHUNK_C, CHUNK_HW,
                       n_hw_chunks, n_chunks, inv_n,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_P: tl.constexpr):
        pid_bg = tl.program_id(0)
        pid_k = tl.program_id(1)
        b = pid_bg // G
        g = pid_bg % G
        hc, c_start, c_end, hw_start, hw_end = _chunk_bounds(pid_k, n_hw_chunks, Cg, HW, CHUNK_C, CHUNK_HW)
        mean = tl.load(MEAN + pid_bg)
        rstd = tl.load(RSTD + pid_bg)
        p = tl.arange(0, BLOCK_P)
        pmask = p < n_chunks
        prow = GPART + pid_bg * n_chunks * 2 + p * 2
        c1 = tl.sum(tl.load(prow, mask=pmask, other=0.0), axis=0) * inv_n
        c2 = tl.sum(tl.load(prow + 1, mask=pmask, other=0.0), axis=0) * inv_n
        xbase = X + b.to(tl.int64) * sxb + (g * Cg).to(tl.int64) * sxc
        gbase = DO + b.to(tl.int64) * sgb + (g * Cg).to(tl.int64) * sgc
        dbase = DX + b.to(tl.int64) * sdb + (g * Cg).to(tl.int64) * sdc
        for c0 in range(c_start, c_end, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < c_end
            ch = g * Cg + offs_c
            w, bias = _affine(W, B, ch, mask_c, HAS_W, HAS_B, BLOCK_C)
            if HAS_S:
                gscale = (tl.load(S + ch, mask=mask_c, other=0.0).to(tl.float32) * w)[:, None]
            else:
                gscale = w[:, None]
            for hw0 in range(hw_start, hw_end, BLOCK_HW):
                offs_hw = hw0 + tl.arange(0, BLOCK_HW)
                mask = mask_c[:, None] & (offs_hw < hw_end)[None, :]
                x = tl.load(xbase + offs_c[:, None] * sxc + offs_hw[None, :] * sxhw, mask=mask, other=0.0)
                go = tl.load(gbase + offs_c[:, None] * sgc + offs_hw[None, :] * sghw, mask=mask, other=0.0)
                y = (x.to(tl.float32) - mean) * rstd
                dy = go.to(tl.float32) * gscale
                if ACT:
                    a = y * w[:, None] + bias[:, None]
                    sig = tl.sigmoid(a)
                    dy = dy * (sig * (1.0 + a * (1.0 - sig)))
                dx = rstd * (dy - c1 - y * c2)
                tl.store(dbase + offs_c[:, None] * sdc + offs_hw[None, :] * sdhw, dx.to(DX.dtype.element_ty),
                         mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------------------

#: Elements per tile (one loop step of one program) and per program (a chunk); the bench can override them.
TILE_ELEMS = int(os.environ.get("EFFNET_FUSED_NORM_TILE", 2048))
CHUNK_ELEMS = int(os.environ.get("EFFNET_FUSED_NORM_CHUNK", 32768))


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _pow2s(lo: int, hi: int):
    p = 1
    while p <= hi:
        if p >= lo:
            yield p
        p *= 2


#: A loop step's fixed cost, in element-lanes, when picking tile shapes (fewer, fuller tiles win).
_STEP_COST = 256


def _pick_tile(n_inner: int, n_outer: int, tile: int, inner_cap: int) -> Tuple[int, int]:
    """Power-of-two tile (inner, outer) of at most ``tile`` lanes minimising lanes processed + per-step cost.

    ``inner`` runs along the contiguous dim and is at least 16 wide (32-byte sectors) when the dim allows.
    """
    best, best_cost = (1, 1), math.inf
    hi_i = max(1, min(inner_cap, tile, _next_pow2(n_inner)))
    for p_i in reversed(list(_pow2s(min(16, hi_i), hi_i))):  # ties go to the wider (better coalesced) tile
        for p_o in reversed(list(_pow2s(1, max(1, min(tile // p_i, _next_pow2(n_outer)))))):
            steps = -(-n_inner // p_i) * -(-n_outer // p_o)
            cost = steps * (p_i * p_o + _STEP_COST)
            if cost < best_cost:
                best, best_cost = (p_i, p_o), cost
    return best


class _Geometry:
    """(B, C, HW) strides of a 4-d tensor whose H and W dims merge, and the chunk/tile decomposition."""

    def __init__(self, x: torch.Tensor, groups: int, tile: int, chunk: int):
        B, C, H, W = x.shape
        self.B, self.C, self.HW, self.G, self.Cg = B, C, H * W, groups, C // groups
        self.channels_inner = _channels_inner(x)
        Cg, HW = self.Cg, self.HW
        if self.channels_inner:  # NHWC: a program spans every channel of its group, a run of positions
            self.block_c, self.block_hw = _pick_tile(Cg, HW, tile, 128)
        else:  # NCHW: a program spans every position, a run of channels
            self.block_hw, self.block_c = _pick_tile(HW, Cg, tile, 1024)
        while True:  # the grid's second dim is capped at 65535 programs
            if self.channels_inner:
                rows = max(1, chunk // max(Cg, 1) // self.block_hw) * self.block_hw
                self.chunk_c, self.chunk_hw = Cg, min(rows, -(-HW // self.block_hw) * self.block_hw)
            else:
                rows = max(1, chunk // max(HW, 1) // self.block_c) * self.block_c
                self.chunk_hw, self.chunk_c = HW, min(rows, -(-Cg // self.block_c) * self.block_c)
            self.n_c_chunks = -(-Cg // self.chunk_c)
            self.n_hw_chunks = -(-HW // self.chunk_hw)
            self.n_chunks = self.n_c_chunks * self.n_hw_chunks
            if self.n_chunks <= 65535:
                break
            chunk *= 2
        self.block_p = max(2, _next_pow2(self.n_chunks))
        self.grid = (B * groups, self.n_chunks)
        # 8 elements per thread and tile: one 16-byte vector of bf16; compiled for sm_90 (ptxas) at 2048-lane
        # tiles this stays at <= 128 registers per thread without spills, the backward reduction included.
        self.num_warps = max(1, min(8, self.block_c * self.block_hw // 256))


def _bchw_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(3)


def _mergeable(t: torch.Tensor) -> bool:
    """H and W collapse into one strided dim (NCHW-contiguous, channels_last, and their batch slices)."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _channels_inner(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1


def _as_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` if its H and W merge and its contiguous dim is ``like``'s (the tiles are laid out for ``like``),
    else a copy in ``like``'s memory format."""
    if _mergeable(t) and _channels_inner(t) == _channels_inner(like):
        return t
    fmt = torch.channels_last if _channels_inner(like) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _fused_forward(x, weight, bias, m, s, groups: int, eps: float, act: bool):
    x = dense(x)
    geo = _Geometry(x, groups, TILE_ELEMS, CHUNK_ELEMS)
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    part = torch.empty((geo.B * groups, geo.n_chunks, 3), **f32)
    mean = torch.empty(geo.B * groups, **f32)
    rstd = torch.empty(geo.B * groups, **f32)
    common = (geo.G, geo.Cg, geo.HW, geo.chunk_c, geo.chunk_hw, geo.n_hw_chunks, geo.n_chunks)
    _stats_kernel[geo.grid](x, part, *_bchw_strides(x), *common,
                            BLOCK_C=geo.block_c, BLOCK_HW=geo.block_hw, num_warps=geo.num_warps)
    dummy = mean  # never read: the HAS_* flag is off
    _fwd_kernel[geo.grid](x, y, part, mean, rstd,
                          weight if weight is not None else dummy, bias if bias is not None else dummy,
                          m if m is not None else dummy, s if s is not None else dummy,
                          *_bchw_strides(x), *_bchw_strides(y), *common, float(eps),
                          HAS_W=weight is not None, HAS_B=bias is not None, HAS_M=m is not None,
                          HAS_S=s is not None, ACT=act, BLOCK_C=geo.block_c, BLOCK_HW=geo.block_hw,
                          BLOCK_P=geo.block_p, num_warps=geo.num_warps)
    return x, y, mean, rstd


def _fused_backward(grad, x, weight, bias, m, s, mean, rstd, groups: int, act: bool, needs):
    need_x, need_w, need_b, need_m, need_s = needs
    grad = _as_layout(grad, x)
    geo = _Geometry(x, groups, TILE_ELEMS, CHUNK_ELEMS)
    f32 = dict(dtype=torch.float32, device=x.device)
    rows = geo.B * geo.n_hw_chunks
    cpart = torch.empty((4, rows, geo.C), **f32)
    gpart = torch.empty((geo.B * groups, geo.n_chunks, 2), **f32)
    dummy = mean
    params = (weight if weight is not None else dummy, bias if bias is not None else dummy,
              m if m is not None else dummy, s if s is not None else dummy)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_S=s is not None, ACT=act)
    common = (geo.G, geo.Cg, geo.HW, geo.chunk_c, geo.chunk_hw, geo.n_hw_chunks, geo.n_chunks)
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None
    need_m = need_m and m is not None
    need_s = need_s and s is not None
    _bwd_reduce_kernel[geo.grid](x, grad, mean, rstd, *params, gpart, cpart,
                                 *_bchw_strides(x), *_bchw_strides(grad), geo.C, *common, rows * geo.C,
                                 HAS_M=m is not None, NEED_W=need_w, NEED_B=need_b, NEED_M=need_m, NEED_S=need_s,
                                 BLOCK_C=geo.block_c, BLOCK_HW=geo.block_hw, num_warps=geo.num_warps, **flags)
    dx = None
    if need_x:
        dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        _bwd_dx_kernel[geo.grid](x, grad, dx, mean, rstd, *params, gpart,
                                 *_bchw_strides(x), *_bchw_strides(grad), *_bchw_strides(dx), *common,
                                 1.0 / (geo.Cg * geo.HW),
                                 BLOCK_C=geo.block_c, BLOCK_HW=geo.block_hw, BLOCK_P=geo.block_p,
                                 num_warps=geo.num_warps, **flags)
    # only the rows the reduction wrote (the others are uninitialised)
    dw = cpart[0].sum(0).to(weight.dtype) if need_w else None
    db = cpart[1].sum(0).to(bias.dtype) if need_b else None
    dm = cpart[2].sum(0).neg_().to(m.dtype) if need_m else None
    ds = cpart[3].sum(0).to(s.dtype) if need_s else None
    return dx, dw, db, dm, ds


class _FusedGroupNormAct(torch.autograd.Function):
    """out = ((silu?)(gamma * groupnorm(x) + beta) - m) * s, every piece optional but the norm."""

    @staticmethod
    def forward(ctx, x, weight, bias, m, s, groups: int, eps: float, act: bool):
        x, y, mean, rstd = _fused_forward(x, weight, bias, m, s, groups, eps, act)
        ctx.save_for_backward(x, weight, bias, m, s, mean, rstd)
        ctx.groups, ctx.act = groups, act
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, m, s, mean, rstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        dx, dw, db, dm, ds = _fused_backward(grad, x, weight, bias, m, s, mean, rstd, ctx.groups, ctx.act, needs)
        return dx, dw, db, dm, ds, None, None, None


# torch.compile: the kernels are not registered as torch.library ops (left for later), so dynamo must not trace
# into them; ``torch._disable_dynamo`` (torch >= 2.1) imports dynamo only when the wrapped function first runs.
_dynamo_off = getattr(torch, "_disable_dynamo", lambda fn=None, recursive=True: fn)


@_dynamo_off
def _apply(x, weight, bias, m, s, groups: int, eps: float, act: bool) -> torch.Tensor:
    _check_input(x)
    return _FusedGroupNormAct.apply(x, weight, bias, m, s, groups, eps, act)


def group_norm_act(x: torch.Tensor, groups: int, eps: float, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, mean: Optional[torch.Tensor] = None,
                   inv_std: Optional[torch.Tensor] = None, act: bool = True) -> torch.Tensor:
    """The fused kernel: ``((swish if act)(weight * group_norm(x) + bias) - mean) * inv_std``, per channel.

    Every per-channel tensor is optional (absent = identity) and differentiable; the output has x's dtype and
    memory format; statistics and arithmetic are fp32.
    """
    if x.shape[1] % groups:
        raise ValueError(f"{groups} groups cannot split {x.shape[1]} channels evenly")
    return _apply(x, weight, bias, mean, inv_std, groups, eps, act)


def fused_norm_act(norm: nn.GroupNorm, act: nn.Module, x: torch.Tensor,
                   deferred: bool = False) -> "torch.Tensor | Tuple[torch.Tensor, torch.Tensor]":
    """The fused equivalent of ``NormAct``: ``act(norm(x))``, or ``act.forward_deferred(norm(x))``.

    ``act`` is a :class:`~models.proxy_norm.ProxyNormActivation` (its m, s computed in PyTorch, its gamma/beta
    used by the kernel) or ``nn.SiLU`` (the norm's own affine is used).
    """
    if isinstance(act, ProxyNormActivation):
        if norm.affine:
            raise ValueError("a proxy-normed unit's norm must have no affine of its own")
        m, s = act.proxy_stats()
        apply_s = act.mode == "full" and not deferred
        out = group_norm_act(x, norm.num_groups, norm.eps, act.weight, act.bias, m, s if apply_s else None)
        return (out, s) if deferred else out
    if not isinstance(act, nn.SiLU):
        raise TypeError(f"the fused norm kernels apply swish or proxy-normed swish, not {type(act).__name__}")
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    return group_norm_act(x, norm.num_groups, norm.eps, weight, bias)


def fused_scale_norm(norm: nn.GroupNorm, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fused equivalent of ``ScaleOnlyNorm``: ``group_norm(x) * weight`` (no shift, no activation)."""
    return group_norm_act(x, norm.num_groups, norm.eps, weight, None, act=False)
