"""Fused norm + swish + proxy-norm kernels vs memory bandwidth and vs PyTorch: ``python -m bench.kernels --help``.

For each activation shape it times, on CUDA, forward + backward of one norm unit (default: layer norm + proxy-
normalised swish, the B0-G16-LN+PN unit) three ways, in the same process:

- ``fused``: the Triton kernels of ``models/fused_norm.py`` (``norm_impl: triton``);
- ``pytorch``: the same unit with ``norm_impl: modules`` (GroupNorm + PN in PyTorch, as on the IPU);
- ``batchnorm``: ``BatchNorm2d + SiLU`` (``BatchNorm2d`` alone for ``scale``), the BN baseline's unit.

and measures the GPU's copy bandwidth with a large ``Tensor.copy_`` (read + write). One JSON line per
(layout, shape, path), after a ``copy`` line (``--layout nhwc,nchw`` runs every shape in both); the fused line
carries a per-kernel breakdown (torch.profiler device times).
``--model efficientnet-b0`` runs every norm unit of B0-G16-LN+PN at ``--resolution`` (160) and ``--batch`` (768)
instead, then a ``total`` line: the summed fwd+bwd norm time per path, weighted by how often each unit occurs.

Bytes: ``T`` = the activation's bytes. What must move at the least is read x + write out (forward) and read x +
read grad + write dx (backward): ``5 T``. The kernels' design moves ``8 T``: the forward reads x twice (statistics,
then normalise), the backward reads x and grad twice (reductions, then dx). ``frac_of_copy`` uses the design bytes
(how close each kernel runs to the copy rate; the target is >= 0.7), ``frac_of_copy_min`` the minimal bytes.

Precision: bf16/fp16 run under ``torch.autocast`` with activations in that dtype, as training does (PyTorch's
GroupNorm then computes and returns fp32 under autocast, which is part of its cost); fp32 runs without autocast.

Without CUDA (or without Triton) it exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from models import ModelConfig, build_model
from models import fused_norm as fn
from models.norms import NormAct, NormSpec, ScaleOnlyNorm, UnitImpl, norm_act, projection_norm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ("full", "deferred_scale", "center_only", "silu", "scale")
#: Test hook: with TRITON_INTERPRET=1 also set, run on the CPU through Triton's interpreter (wall-clock timings,
#: meaningless as numbers) so the script's plumbing is checked without a GPU.
CPU_SMOKE = os.environ.get("EFFNET_BENCH_CPU_SMOKE") == "1"
DEVICE = "cpu" if CPU_SMOKE else "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def model_units(name: str, resolution: int, group_dim: int = 16, expand_ratio: Optional[int] = 4,
                norm: str = "layer") -> List[Dict]:
    """Every norm unit of a proxy-normed model at ``resolution``: kind, (C, H, W) and how many share them."""
    model = build_model(ModelConfig(name=name, norm=norm, proxy_norm=True, group_dim=group_dim,
                                    expand_ratio=expand_ratio, norm_impl="modules")).eval()
    counts: Dict[tuple, int] = {}

    def record(kind: str, x: torch.Tensor) -> None:
        key = (kind,) + tuple(x.shape[1:])
        counts[key] = counts.get(key, 0) + 1

    for unit in model.modules():
        if isinstance(unit, ScaleOnlyNorm):
            unit.register_forward_pre_hook(lambda m, inp: record("scale", inp[0]))
        elif isinstance(unit, NormAct):
            kind = getattr(unit.act, "mode", "silu")
            unit.register_forward_pre_hook(lambda m, inp, kind=kind: record(kind, inp[0]))
            if kind == "deferred_scale":  # called as forward_deferred: no module hook fires
                unit.forward_deferred = (lambda x, f=unit.forward_deferred, k=kind: (record(k, x), f(x))[1])
    with torch.no_grad():
        model(torch.randn(1, 3, resolution, resolution))
    return [{"kind": k[0], "chw": list(k[1:]), "count": n} for k, n in counts.items()]


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"bench.kernels: {message}", file=sys.stderr)
    sys.exit(2)


def cuda_timer(fn: Callable[[], None], iters: int, warmup: int) -> List[float]:
    """Milliseconds per call, one CUDA-event pair per call, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def copy_bandwidth(nbytes: int, iters: int, warmup: int) -> Dict:
    """GB/s of ``dst.copy_(src)`` over ``nbytes`` (counted as read + write)."""
    n = max(nbytes // 2, 1 << 20)
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_timer(lambda: dst.copy_(src), iters, warmup))
    moved = 2 * src.numel() * src.element_size()
    return {"what": "copy", "bytes": moved, "ms": ms, "gbs": moved / ms / 1e6}


def release() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def build_unit(kind: str, norm: str, groups: int, channels: int, impl: UnitImpl) -> nn.Module:
    spec = NormSpec(kind=norm, num_groups=groups, proxy_norm=kind != "silu", impl=impl)
    if kind == "scale":
        return projection_norm(spec, channels)  # proxy-normed: the scale-only norm
    return norm_act(spec, channels) if kind == "silu" else norm_act(spec, channels, proxy_mode=kind)


def unit_step(unit: nn.Module, x: torch.Tensor, grad: torch.Tensor, deferred: bool) -> Callable[[], None]:
    def step() -> None:
        unit.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        out = unit.forward_deferred(xx)[0] if deferred else unit(xx)
        out.backward(grad.to(out.dtype))
    return step


def unit_forward(unit: nn.Module, x: torch.Tensor, deferred: bool) -> Callable[[], None]:
    def fwd() -> None:
        with torch.no_grad():
            unit.forward_deferred(x) if deferred else unit(x)
    return fwd


def per_kernel(step: Callable[[], None], bytes_per_kernel: Dict[str, int], copy_gbs: float) -> Dict:
    """Device time per fused kernel over a few steps, with each kernel's bandwidth."""
    from torch.profiler import ProfilerActivity, profile

    step()
    _sync()
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        _sync()
    out = {}
    for evt in prof.key_averages():
        name = evt.key
        for kernel, nbytes in bytes_per_kernel.items():
            if kernel in name:
                dev_us = getattr(evt, "device_time_total", None)
                if dev_us is None:
                    dev_us = getattr(evt, "cuda_time_total", 0.0)
                ms = dev_us / 1e3 / reps
                out[kernel] = {"ms": ms, "gbs": nbytes / ms / 1e6 if ms else None,
                               "frac_of_copy": nbytes / ms / 1e6 / copy_gbs if ms else None}
    return out


def bench_shape(shape: Sequence[int], args: argparse.Namespace, copy_gbs: float,
                kind: Optional[str] = None) -> List[Dict]:
    kind = kind or args.kind
    B, C, H, W = shape
    dtype = DTYPES[args.dtype]
    fmt = torch.channels_last if args.layout == "nhwc" else torch.contiguous_format
    autocast = (torch.autocast(DEVICE, dtype=dtype) if dtype != torch.float32 else nullcontext())
    x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    grad = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    T = x.numel() * x.element_size()
    deferred = kind == "deferred_scale"
    groups = 1 if args.norm == "layer" else args.groups
    base = {"shape": list(shape), "dtype": args.dtype, "layout": args.layout, "norm": args.norm, "kind": kind,
            "bytes_act": T}
    lines = []
    ref_ms = None
    paths: List[Tuple[str, Optional[UnitImpl]]] = [("pytorch", "modules"), ("fused", "triton")]
    paths += [("batchnorm", None)] if args.batchnorm else []
    for label, mode in paths:
        if mode is None:
            # the BN network's unit at this place: BN + swish, or BN alone after a projection
            unit: nn.Module = nn.BatchNorm2d(C) if kind == "scale" else nn.Sequential(nn.BatchNorm2d(C), nn.SiLU())
        else:
            unit = build_unit(kind, args.norm, groups, C, mode)
        unit = unit.to(DEVICE).to(memory_format=fmt)
        dfr = deferred and mode is not None
        with autocast:
            step = unit_step(unit, x, grad, dfr)
            fwd = unit_forward(unit, x, dfr)
            try:
                fwdbwd = statistics.median(cuda_timer(step, args.iters, args.warmup))
                fwd_ms = statistics.median(cuda_timer(fwd, args.iters, args.warmup))
            except torch.cuda.OutOfMemoryError:
                lines.append(dict(base, path=label, error="out of memory"))
                release()
                continue
            line = dict(base, path=label, fwd_ms=fwd_ms, bwd_ms=fwdbwd - fwd_ms, fwdbwd_ms=fwdbwd,
                        gbs_min=5 * T / fwdbwd / 1e6)
            if label == "fused":
                line.update(gbs=8 * T / fwdbwd / 1e6, frac_of_copy=8 * T / fwdbwd / 1e6 / copy_gbs,
                            frac_of_copy_min=5 * T / fwdbwd / 1e6 / copy_gbs,
                            fwd_frac_of_copy=3 * T / fwd_ms / 1e6 / copy_gbs)
                geo = fn._Geometry(x, groups, fn.TILE_ELEMS, fn.CHUNK_ELEMS)
                line["config"] = {"tile": fn.TILE_ELEMS, "chunk": fn.CHUNK_ELEMS, "block_c": geo.block_c,
                                  "block_hw": geo.block_hw, "chunks_per_group": geo.n_chunks,
                                  "grid": list(geo.grid), "num_warps": geo.num_warps}
                if args.per_kernel and DEVICE == "cuda":
                    line["kernels"] = per_kernel(step, {"_stats_kernel": T, "_fwd_kernel": 2 * T,
                                                        "_bwd_reduce_kernel": 2 * T, "_bwd_dx_kernel": 3 * T},
                                                 copy_gbs)
            if label == "pytorch":
                ref_ms = fwdbwd
            elif ref_ms is not None:
                line["speedup_vs_pytorch"] = ref_ms / fwdbwd
            lines.append(line)
        del unit, step, fwd
        release()
    by_path = {ln["path"]: ln for ln in lines if "fwdbwd_ms" in ln}
    if "batchnorm" in by_path and "fused" in by_path:
        by_path["fused"]["vs_batchnorm"] = by_path["fused"]["fwdbwd_ms"] / by_path["batchnorm"]["fwdbwd_ms"]
    return lines


def parse_shapes(texts: Optional[List[str]]) -> List[List[int]]:
    if not texts:
        texts = ["768,96,80,80"]
    shapes = []
    for text in texts:
        dims = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
        if len(dims) != 4 or min(dims) < 1:
            raise SystemExit(f"bench.kernels: --shape {text!r}: expected B,C,H,W")
        shapes.append(dims)
    return shapes


def _layouts(text: str) -> List[str]:
    layouts = [v.strip() for v in text.split(",") if v.strip()]
    if not layouts or any(v not in ("nhwc", "nchw") for v in layouts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected nhwc, nchw or nhwc,nchw")
    return layouts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="B,C,H,W (repeatable; default 768,96,80,80)")
    p.add_argument("--model", default=None, help="instead of --shape: every norm unit of this model preset "
                   "(e.g. efficientnet-b0) with G16, expand 4, --norm + PN at --resolution and --batch, each "
                   "with its own kind, plus a 'total' line weighting each unit by how often it occurs")
    p.add_argument("--resolution", type=int, default=160, help="for --model")
    p.add_argument("--batch", type=int, default=768, help="for --model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layout", type=_layouts, default=["nhwc"],
                   help="nhwc, nchw, or both comma-separated (every shape in each, in that order; one with --model)")
    p.add_argument("--norm", choices=("layer", "group"), default="layer")
    p.add_argument("--groups", type=int, default=4, help="groups for --norm group")
    p.add_argument("--kind", choices=KINDS, default="full",
                   help="unit: proxy-norm mode (full/deferred_scale/center_only), silu (no PN), scale (projection)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tile", type=int, default=None, help="elements per tile (models.fused_norm.TILE_ELEMS)")
    p.add_argument("--chunk", type=int, default=None, help="elements per program (models.fused_norm.CHUNK_ELEMS)")
    p.add_argument("--no-batchnorm", dest="batchnorm", action="store_false", help="skip the BatchNorm reference")
    p.add_argument("--no-per-kernel", dest="per_kernel", action="store_false", help="skip the profiler breakdown")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    layouts = args.layout
    if args.model and len(layouts) > 1:
        parser.error("--model takes one --layout (its total line sums one layout's units)")
    args.layout = layouts[0]
    if not torch.cuda.is_available() and not CPU_SMOKE:
        fail("needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
             f"(torch {torch.__version__}); the fused kernels are Triton GPU kernels. Nothing was measured.")
    if fn.triton_error() is not None:
        fail(f"the fused kernels cannot run: {fn.triton_error()}")
    if args.tile:
        fn.TILE_ELEMS = args.tile
    if args.chunk:
        fn.CHUNK_ELEMS = args.chunk
    if args.model:
        units = model_units(args.model, args.resolution, norm=args.norm)
        jobs = [([args.batch] + u["chw"], u["kind"], u["count"]) for u in units]
    else:
        jobs = [(shape, args.kind, 1) for shape in parse_shapes(args.shape)]
    largest = max(B * C * H * W for (B, C, H, W), _, _ in jobs) * DTYPES[args.dtype].itemsize
    cp = copy_bandwidth(max(largest, 1 << 30) if DEVICE == "cuda" else largest, args.iters, args.warmup)
    name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu (Triton interpreter smoke run)"
    cp.update(device=name, torch=torch.__version__, triton=getattr(fn.triton, "__version__", None))
    print(json.dumps(cp), flush=True)
    totals: Dict[str, float] = {}
    for layout, (shape, kind, count) in [(layout, job) for layout in layouts for job in jobs]:
        args.layout = layout
        for line in bench_shape(shape, args, cp["gbs"], kind):
            line["count"] = count
            print(json.dumps(line), flush=True)
            if "fwdbwd_ms" in line:
                totals[line["path"]] = totals.get(line["path"], 0.0) + count * line["fwdbwd_ms"]
    if args.model:
        total = {"what": "total", "model": args.model, "resolution": args.resolution, "batch": args.batch,
                 "dtype": args.dtype, "layout": args.layout, "norm": args.norm, "units": sum(j[2] for j in jobs),
                 "fwdbwd_ms": totals}
        if "fused" in totals and "pytorch" in totals:
            total["fused_speedup_vs_pytorch"] = totals["pytorch"] / totals["fused"]
        if "fused" in totals and "batchnorm" in totals:
            total["fused_vs_batchnorm"] = totals["fused"] / totals["batchnorm"]
        print(json.dumps(total), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
