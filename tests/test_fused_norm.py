"""Fused Triton norm + swish + proxy-norm kernels (models/fused_norm.py) against the PyTorch modules.

Three tiers:
- everywhere: the construction-time choice (``auto`` never picks the kernels, ``triton`` without CUDA or Triton
  names ``model.norm_impl`` in its error, the state dict does not depend on the implementation);
- CPU with Triton >= 3.0: the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess so it is
  set before Triton is imported) and every output and gradient must match the PyTorch modules;
- CUDA: the same comparisons at realistic shapes in fp32 and bf16, and checkpoints moving between the paths.

Run this file as a script (``python tests/test_fused_norm.py --interpret``, with ``TRITON_INTERPRET=1``) to get the
interpreter comparison as JSON lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script
    sys.path.insert(0, str(REPO))

from models import ModelConfig, build_model  # noqa: E402
from models import fused_norm as fn  # noqa: E402
from models.norms import (  # noqa: E402
    NormAct,
    NormImplError,
    NormSpec,
    ScaleOnlyNorm,
    TritonNormAct,
    TritonScaleOnlyNorm,
    norm_act,
    projection_norm,
    resolve_norm_impl,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
needs_kernels = pytest.mark.skipif(fn.triton_error() is not None,
                                   reason=f"fused kernels unavailable: {fn.triton_error()}")


# --------------------------------------------------------------------------------------------------------------
# Units under test, shared by the interpreter runner and the GPU tests
# --------------------------------------------------------------------------------------------------------------

def _unit(kind: str, spec: NormSpec, channels: int) -> nn.Module:
    if kind == "scale":
        return projection_norm(spec, channels)  # proxy-normed: the scale-only norm
    if kind == "silu":
        return norm_act(spec, channels)
    return norm_act(spec, channels, proxy_mode=kind)  # full / deferred_scale / center_only


def _randomise(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("weight") and "proxy" not in name else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))


def _run(module: nn.Module, x: torch.Tensor, upstream):
    """Forward (deferred units return (centred, s)), backward of sum(out * upstream); outputs and grads."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    if isinstance(module, NormAct) and getattr(module.act, "mode", None) == "deferred_scale":
        out, scale = module.forward_deferred(x)
        outs = [out, scale]
    else:
        outs = [module(x)]
    loss = sum((o.float() * u).sum() for o, u in zip(outs, upstream, strict=True))
    loss.backward()
    grads = {"x": x.grad.float()}
    grads.update({n: p.grad.float() for n, p in module.named_parameters() if p.grad is not None})
    return [o.detach().float() for o in outs], grads, outs[0]


def compare(kind: str, norm: str, layout: str, shape, dtype: torch.dtype, device: str, seed: int = 0):
    """Max abs errors (scaled by the reference's max) of the fused path vs PyTorch (fp32 reference: what ``auto``
    builds for ``device``)."""
    B, C, H, W = shape
    spec_kw = dict(kind=norm, num_groups=4, eps=1e-3, proxy_norm=kind not in ("silu",))
    if kind == "scale":
        spec_kw["proxy_norm"] = True
    ref = _unit(kind, NormSpec(**spec_kw, impl=resolve_norm_impl("auto", norm, device)), C)
    _randomise(ref, seed)
    fused = _unit(kind, NormSpec(**spec_kw, impl="triton"), C)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(device), fused.to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = (2.0 * torch.randn(shape, generator=gen) + 0.5).to(device)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x_ref = x.contiguous(memory_format=fmt)
    x_fused = x.to(dtype).contiguous(memory_format=fmt)
    deferred = kind == "deferred_scale"
    upstream = [torch.randn(shape, generator=gen).to(device)]
    if deferred:
        upstream.append(torch.randn(C, generator=gen).to(device))
    outs_r, grads_r, _ = _run(ref, x_ref, upstream)
    outs_f, grads_f, raw = _run(fused, x_fused, upstream)
    result = {"kind": kind, "norm": norm, "layout": layout, "shape": list(shape), "dtype": str(dtype),
              "out_dtype": str(raw.dtype), "same_strides": raw.stride() == x_fused.stride(),
              "grad_keys": sorted(grads_r), "grad_keys_fused": sorted(grads_f)}
    errs = {}
    for i, (a, b) in enumerate(zip(outs_f, outs_r, strict=True)):
        errs[f"out{i}"] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    for k in grads_r:
        if k in grads_f:
            a, b = grads_f[k], grads_r[k]
            errs[k] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    result["errs"] = errs
    return result


# Small, odd shapes: C not a multiple of 16, H*W not a power of two; group norm needs C % 4 == 0.
INTERP_CASES = [
    ("full", "layer", "nchw", (2, 20, 5, 7)),
    ("full", "group", "nhwc", (2, 36, 3, 5)),
    ("deferred_scale", "layer", "nhwc", (2, 20, 5, 7)),
    ("deferred_scale", "group", "nchw", (2, 36, 3, 5)),
    ("center_only", "layer", "nhwc", (2, 12, 3, 3)),
    ("center_only", "group", "nchw", (2, 20, 3, 5)),
    ("silu", "layer", "nchw", (2, 12, 5, 7)),
    ("silu", "group", "nhwc", (2, 20, 3, 5)),
    ("scale", "layer", "nhwc", (2, 20, 5, 7)),
    ("scale", "group", "nchw", (2, 20, 3, 5)),
    ("full", "layer", "nhwc", (3, 20, 1, 1)),  # 1x1 spatial: the head at CIFAR's 32 px
]
INTERP_BF16_CASES = [
    ("full", "layer", "nhwc", (2, 20, 5, 7)),
    ("silu", "group", "nchw", (2, 20, 3, 5)),
]
FP32_TOL = 2e-5
BF16_TOL = 3e-2


def interpret_main() -> None:
    """Subprocess entry (TRITON_INTERPRET=1): one JSON line per case, then one summary line."""
    assert fn.interpreter_enabled(), "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    # Tiny tiles and chunks: every group spans several programs and every program several tiles, so the
    # chunk-partial combination (Welford/Chan) and the backward's per-chunk sums are exercised.
    fn.TILE_ELEMS, fn.CHUNK_ELEMS = 32, 64
    for i, (kind, norm, layout, shape) in enumerate(INTERP_CASES):
        print(json.dumps(compare(kind, norm, layout, shape, torch.float32, "cpu", seed=i)), flush=True)
    for i, (kind, norm, layout, shape) in enumerate(INTERP_BF16_CASES):
        print(json.dumps(compare(kind, norm, layout, shape, torch.bfloat16, "cpu", seed=100 + i)), flush=True)
    fn.TILE_ELEMS, fn.CHUNK_ELEMS = 2048, 32768  # defaults: one program per group at these sizes
    print(json.dumps(compare("full", "layer", "nhwc", (2, 20, 5, 7), torch.float32, "cpu", seed=7)), flush=True)
    print(json.dumps(partial_grads("cpu")), flush=True)
    print(json.dumps(block_compare("cpu", (2, 16, 5, 6))), flush=True)
    print(json.dumps(stability("cpu")), flush=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for saved, loaded in (("triton", "modules"), ("modules", "triton")):
            r = checkpoint_roundtrip(Path(tmp), "cpu", saved, loaded, resolution=32, batch=2, steps=1,
                                     width_mult=0.25, depth_mult=0.25)
            print(json.dumps({"checkpoint": dict(r, saved=saved, loaded=loaded)}), flush=True)


def partial_grads(device: str) -> dict:
    """Only some inputs need gradients (frozen x, beta, m, s): the kernel skips the rest and gets these right."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 20, 3, 5, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    w = (1 + 0.3 * torch.randn(20, generator=gen)).to(device).requires_grad_()
    b, m, s = (0.3 * torch.randn(20, generator=gen)).to(device), torch.full((20,), 0.2, device=device), \
        torch.full((20,), 1.7, device=device)
    up = torch.randn(x.shape, generator=gen).to(device)  # NCHW gradient for an NHWC activation
    (gw,) = torch.autograd.grad((fn.group_norm_act(x, 4, 1e-3, w, b, m, s) * up).sum(), [w])
    sh = (1, -1, 1, 1)
    ref = (torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, eps=1e-3) * w.view(sh) + b.view(sh))
           - m.view(sh)) * s.view(sh)
    (rw,) = torch.autograd.grad((ref * up).sum(), [w])
    return {"partial": ((gw - rw).abs().max() / rw.abs().max()).item()}


def block_compare(device: str, shape) -> dict:
    """A whole G16 MBConv (expand LN+PN, group conv LN+PN with the scale folded into the SE gate, projection
    LN with scale only): output and every parameter gradient, fused vs PyTorch."""
    from models.efficientnet import BlockConfig, make_block

    torch.manual_seed(3)
    cfg = BlockConfig(shape[1], shape[1], 4, 3, 1, 0.25, 1.0, "mbconv")
    ref = make_block(cfg, NormSpec("layer", proxy_norm=True, impl=resolve_norm_impl("auto", "layer", device)), 16)
    _randomise_norms(ref)
    fused = make_block(cfg, NormSpec("layer", proxy_norm=True, impl="triton"), 16)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(device), fused.to(device)
    x = torch.randn(shape).to(device)
    errs = {}
    outs = []
    for module in (ref, fused):
        xx = x.clone().requires_grad_()
        out = module(xx)
        out.backward(torch.ones_like(out))
        outs.append((out.detach(), xx.grad, {n: p.grad for n, p in module.named_parameters()}))
    (o_r, x_r, g_r), (o_f, x_f, g_f) = outs
    errs["out"] = ((o_f - o_r).abs().max() / o_r.abs().max()).item()
    errs["x"] = ((x_f - x_r).abs().max() / x_r.abs().max()).item()
    for n in g_r:
        errs[n] = ((g_f[n] - g_r[n]).abs().max() / g_r[n].abs().max().clamp_min(1e-12)).item()
    return {"block": errs}


def _randomise_norms(module: nn.Module) -> None:
    for unit in module.modules():
        if isinstance(unit, (NormAct, ScaleOnlyNorm)):
            _randomise(unit, 11)


def stability(device: str) -> dict:
    """Statistics of a large-mean activation (mean 300, std 1: var/mean^2 ~ 1e-5) against float64."""
    gen = torch.Generator().manual_seed(5)
    x = (300.0 + torch.randn(2, 16, 48, 48, generator=gen)).to(device)
    ref = torch.nn.functional.group_norm(x.double(), 1, eps=1e-3)
    out = {}
    for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
        got = fn.group_norm_act(x.contiguous(memory_format=fmt), 1, 1e-3, act=False)
        out[layout] = (got.double() - ref).abs().max().item()
    return {"stability": out}


# --------------------------------------------------------------------------------------------------------------
# Everywhere: selection
# --------------------------------------------------------------------------------------------------------------

def _pn_unit(impl: str = "modules", proxy_mode: str = "full") -> NormAct:
    unit = norm_act(NormSpec("layer", proxy_norm=True, impl=impl), 12, proxy_mode=proxy_mode)  # type: ignore[arg-type]
    _randomise(unit, 0)
    return unit


def test_the_modules_path_is_the_plain_modules(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    unit = _pn_unit("modules")
    x = torch.randn(2, 12, 5, 7)
    assert torch.equal(unit(x), unit.act(unit.norm(x)))
    deferred = _pn_unit("modules", "deferred_scale")
    out, scale = deferred.forward_deferred(x)
    ref_out, ref_scale = deferred.act.forward_deferred(deferred.norm(x))
    assert torch.equal(out, ref_out) and torch.equal(scale, ref_scale)
    scale_only = projection_norm(NormSpec("group", proxy_norm=True), 12)
    assert torch.equal(scale_only(x), scale_only.norm(x) * scale_only.weight.view(1, -1, 1, 1))


def test_checkpoints_move_between_the_kernels_and_the_modules(monkeypatch):
    """A ``triton`` and a ``modules`` model have the same parameters and keys, so a checkpoint loads strictly either
    way; every unit of the ``triton`` model is a Triton one (nothing runs here: built for CUDA, kept on the CPU)."""
    monkeypatch.setattr(fn, "_TRITON_ERROR", None)  # building needs no kernel
    torch.manual_seed(0)
    cfg = dict(norm="layer", proxy_norm=True, group_dim=16, expand_ratio=4, num_classes=10, width_mult=0.25,
               depth_mult=0.25)
    on = build_model(ModelConfig(**cfg, norm_impl="triton"), "cuda")
    off = build_model(ModelConfig(**cfg, norm_impl="modules"), "cuda")
    assert on.norm_impl == "triton" and off.norm_impl == "modules"
    units = [m for m in on.modules() if isinstance(m, (NormAct, ScaleOnlyNorm))]
    assert units and {type(u) for u in units} == {TritonNormAct, TritonScaleOnlyNorm}
    assert list(on.state_dict()) == list(off.state_dict())
    loaded = off.load_state_dict(on.state_dict())  # strict: a missing or unexpected key raises
    assert loaded.missing_keys == [] and loaded.unexpected_keys == []
    assert [p.shape for p in on.parameters()] == [p.shape for p in off.parameters()]


def test_triton_without_cuda_names_the_setting(monkeypatch):
    """At construction for a CPU (no interpreter), and at the call for a unit built anyway and given a CPU tensor."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = ModelConfig(norm="layer", proxy_norm=True, norm_impl="triton", width_mult=0.25, depth_mult=0.25)
    with pytest.raises(NormImplError, match=r"model\.norm_impl: triton.*(cpu|triton)"):
        build_model(cfg)
    with pytest.raises(RuntimeError, match=r"model\.norm_impl: triton.*(cpu|triton)"):
        _pn_unit("triton")(torch.randn(2, 12, 3, 3))
    scale_only = projection_norm(NormSpec("layer", proxy_norm=True, impl="triton"), 12)
    with pytest.raises(RuntimeError, match=r"model\.norm_impl"):
        scale_only(torch.randn(2, 12, 3, 3))


def test_auto_never_picks_the_kernels_even_where_they_could_run(monkeypatch):
    """The kernels have not run on a GPU yet, so the default must not pick them for CUDA either."""
    monkeypatch.setattr(fn, "_TRITON_ERROR", None)
    assert resolve_norm_impl("triton", "layer", "cuda") == "triton"
    assert {resolve_norm_impl("auto", "layer", target) for target in ("cuda", "cpu", "ipu")} <= {"modules",
                                                                                                 "function"}


def test_triton_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(fn, "_TRITON_ERROR", "triton is not importable (ModuleNotFoundError: no triton)")
    assert resolve_norm_impl("auto", "layer", "cuda") == "modules"
    with pytest.raises(NormImplError, match=r"model\.norm_impl: triton.*triton is not importable"):
        resolve_norm_impl("triton", "layer", "cuda")
    with pytest.raises(RuntimeError, match=r"model\.norm_impl: triton.*triton is not importable"):
        _pn_unit("triton")(torch.randn(2, 12, 3, 3))


def test_batch_norm_refuses_the_kernels():
    with pytest.raises(ValueError, match=r"model\.norm_impl: triton needs model\.norm group or layer"):
        ModelConfig(norm="batch", norm_impl="triton").validate()
    ModelConfig(norm="batch", norm_impl="auto").validate()
    with pytest.raises(ValueError, match=r"model\.norm_impl: triton needs model\.norm group or layer"):
        NormSpec("batch", impl="triton")


def test_tile_picker_is_sane():
    for n_inner, n_outer in [(96, 6400), (6400, 96), (25, 1280), (1280, 25), (20, 35), (1, 1), (3, 1)]:
        p_i, p_o = fn._pick_tile(n_inner, n_outer, 2048, 128)
        assert p_i & (p_i - 1) == 0 and p_o & (p_o - 1) == 0 and p_i * p_o <= 2048
        assert p_i >= min(16, fn._next_pow2(n_inner))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit; this machine has CUDA")
def test_kernel_bench_exits_2_without_cuda(capsys):
    from bench import kernels

    with pytest.raises(SystemExit) as exc:
        kernels.main(["--shape", "2,8,4,4"])
    assert exc.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_kernel_bench_parses_shapes():
    from bench import kernels

    assert kernels.parse_shapes(["768,96,80,80", "2x8x4x4"]) == [[768, 96, 80, 80], [2, 8, 4, 4]]
    with pytest.raises(SystemExit):
        kernels.parse_shapes(["1,2,3"])


def test_kernel_bench_finds_every_norm_unit_of_b0():
    from bench import kernels

    units = kernels.model_units("efficientnet-b0", 160)
    by_kind = {}
    for u in units:
        by_kind[u["kind"]] = by_kind.get(u["kind"], 0) + u["count"]
    # stem + 15 expanding blocks (full), 16 group convs (deferred), 16 projections (scale), head (centre)
    assert by_kind == {"full": 16, "deferred_scale": 16, "scale": 16, "center_only": 1}, by_kind
    assert {"kind": "full", "chw": [32, 80, 80], "count": 1} in units


# --------------------------------------------------------------------------------------------------------------
# CPU: Triton's interpreter
# --------------------------------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.slow
def test_interpreted_kernels_match_pytorch():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpret"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(INTERP_CASES) + len(INTERP_BF16_CASES) + 6
    for _ in range(2):  # a checkpoint trained/saved on one path loads and evaluates the same on the other
        ck = results.pop()["checkpoint"]
        assert ck["keys_equal"] and ck["argmax_agree"] == 1.0 and ck["max_abs"] < 1e-4 * max(1.0, ck["scale"]), ck
    stable = results.pop()["stability"]
    assert max(stable.values()) < 1e-3, stable  # a naive E[x^2] - E[x]^2 in fp32 is off by ~1 here
    block = results.pop()["block"]
    assert len(block) > 10 and max(block.values()) < 1e-4, block
    assert results.pop()["partial"] < FP32_TOL
    for r in results:
        bf16 = r["dtype"] == "torch.bfloat16"
        assert r["out_dtype"] == r["dtype"] and r["same_strides"], r
        assert r["grad_keys"] == r["grad_keys_fused"], r
        expected = {"x"} | {k for k in r["grad_keys"]}
        assert set(r["errs"]) >= expected, r
        tol = BF16_TOL if bf16 else FP32_TOL
        bad = {k: v for k, v in r["errs"].items() if not v <= tol}
        assert not bad, f"{r['kind']} {r['norm']} {r['layout']} {r['dtype']}: {bad}"
    # every gradient the brief names was checked somewhere
    checked = set().union(*(r["errs"] for r in results))
    assert {"x", "act.weight", "act.bias", "act.proxy_bias", "act.proxy_weight", "norm.weight", "norm.bias",
            "weight", "out1"} <= checked


_POINTER_ARGS = {"X", "Y", "DO", "DX", "PART", "MEAN", "RSTD", "W", "B", "M", "S", "GPART", "CPART"}


def _compile_for_sm90(kernel, dtype: str, constexprs: dict, ones, num_warps: int = 8) -> str:
    """Compile one kernel to an sm_90 cubin with Triton's bundled ptxas (no GPU needed); cuobjdump's usage line.

    Integer arguments get the ``divisible by 16`` hint Triton's launcher gives B0's shapes; ``ones`` are the
    arguments equal to 1 (specialised away, as for the unit stride of the layout)."""
    import shutil
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"X": dtype, "Y": dtype, "DO": dtype, "DX": dtype}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs or name in ones:
            signature[name] = "constexpr"
        elif name in _POINTER_ARGS:
            signature[name] = "*" + pointers.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("eps", "inv_n"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in ("G", "n_hw_chunks", "n_chunks"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, dict(constexprs, **{n: 1 for n in ones}), attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        tool = shutil.which("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return next(line for line in usage.splitlines() if "REG:" in line)


@needs_kernels
@pytest.mark.slow
@pytest.mark.needs_new_torch
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter does not compile: ptxas does. Every kernel, both layouts, bf16, full PN: it compiles for
    sm_90, without register spills."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no offline compile API: {exc}")
    flags = dict(HAS_W=True, HAS_B=True, HAS_S=True, ACT=True)
    kernels = [(fn._stats_kernel, {}), (fn._fwd_kernel, dict(flags, HAS_M=True, BLOCK_P=32)),
               (fn._bwd_reduce_kernel, dict(flags, HAS_M=True, NEED_W=True, NEED_B=True, NEED_M=True,
                                            NEED_S=True)),
               (fn._bwd_dx_kernel, dict(flags, BLOCK_P=32))]
    layouts = [((32, 64), ("sxc", "syc", "sgc", "sdc", "G")),  # NHWC layer norm, C=96
               ((8, 256), ("sxhw", "syhw", "sghw", "sdhw"))]  # NCHW group norm
    for (block_c, block_hw), ones in layouts:
        for kernel, constexprs in kernels:
            ones_here = [n for n in ones if n in kernel.arg_names]
            try:
                usage = _compile_for_sm90(kernel, "bf16", dict(constexprs, BLOCK_C=block_c, BLOCK_HW=block_hw),
                                          ones_here)
            except (RuntimeError, FileNotFoundError, StopIteration) as exc:  # no ptxas / cuobjdump here
                if "ptxas" in str(exc) or isinstance(exc, (FileNotFoundError, StopIteration)):
                    pytest.skip(f"no CUDA toolchain in this Triton install: {exc}")
                raise
            assert "LOCAL:0" in usage and "STACK:0" in usage, (kernel.__name__, block_c, block_hw, usage)


COMPILE_SCRIPT = """
import torch
from models import fused_norm as fn
from models.norms import NormSpec, norm_act, resolve_norm_impl
torch.manual_seed(0)
unit = norm_act(NormSpec("layer", proxy_norm=True, impl="triton"), 12)
ref = norm_act(NormSpec("layer", proxy_norm=True, impl=resolve_norm_impl("auto", "layer")), 12)
ref.load_state_dict(unit.state_dict())
seen = []
def probe(x):
    seen.append(torch.compiler.is_compiling())  # dynamo is tracing this call
    return x * 2
x = torch.randn(2, 12, 3, 5, requires_grad=True)
out = torch.compile(lambda t: unit(probe(t)), backend="aot_eager")(x)
out.sum().backward()
grad = x.grad.clone()
x.grad = None
expected = ref(x * 2)
expected.sum().backward()
assert seen and seen[0], seen  # the unit really ran under torch.compile
assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(grad, x.grad, atol=1e-5)
print("ok")
"""


@needs_kernels
@pytest.mark.slow
@pytest.mark.needs_new_torch
def test_fused_on_under_torch_compile_in_the_interpreter():
    """``triton`` under torch.compile runs the kernels behind a graph break, with the right gradients."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


@needs_kernels
@pytest.mark.slow
def test_kernel_bench_plumbing_in_the_interpreter():
    """bench.kernels end to end on the CPU (its test hook): every path, every field, valid JSON."""
    env = dict(os.environ, TRITON_INTERPRET="1", EFFNET_BENCH_CPU_SMOKE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bench.kernels", "--shape", "2,20,3,5", "--iters", "1",
                           "--warmup", "0", "--dtype", "bf16", "--kind", "deferred_scale"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [ln.get("path", ln.get("what")) for ln in lines] == ["copy", "pytorch", "fused", "batchnorm"]
    fused = lines[2]
    for key in ("fwd_ms", "bwd_ms", "fwdbwd_ms", "gbs", "frac_of_copy", "frac_of_copy_min", "speedup_vs_pytorch",
                "vs_batchnorm", "config"):
        assert key in fused, key


# --------------------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    ("full", "layer", "nhwc", (32, 96, 80, 80)),
    ("full", "layer", "nchw", (32, 96, 80, 80)),
    ("deferred_scale", "layer", "nhwc", (16, 144, 40, 40)),
    ("center_only", "layer", "nhwc", (64, 1280, 5, 5)),
    ("full", "group", "nhwc", (16, 240, 20, 20)),
    ("silu", "group", "nchw", (16, 40, 56, 56)),
    ("silu", "layer", "nhwc", (8, 24, 112, 112)),
    ("scale", "layer", "nhwc", (32, 40, 40, 40)),
    ("scale", "group", "nchw", (8, 100, 13, 17)),
]


@pytest.mark.cuda
@needs_cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind,norm,layout,shape", GPU_CASES, ids=["-".join(map(str, c[:3])) for c in GPU_CASES])
def test_gpu_kernels_match_pytorch(kind, norm, layout, shape, dtype):
    r = compare(kind, norm, layout, shape, dtype, "cuda")
    assert r["out_dtype"] == str(dtype) and r["same_strides"], r
    assert r["grad_keys"] == r["grad_keys_fused"], r
    # fp32: TF32 is not involved (no matmuls); reductions over up to 614k elements differ in order only.
    tol = 1e-4 if dtype == torch.float32 else BF16_TOL
    bad = {k: v for k, v in r["errs"].items() if not v <= tol}
    assert not bad, bad


def checkpoint_roundtrip(tmp_path: Path, device: str, saved_with: str, loaded_with: str, resolution: int,
                         batch: int, steps: int = 3, **overrides) -> dict:
    """Train a few steps with one path, save, load into a model on the other path, evaluate both."""
    torch.manual_seed(0)
    cfg = dict(norm="layer", proxy_norm=True, group_dim=16, expand_ratio=4, num_classes=10, **overrides)

    def make(impl: str) -> nn.Module:
        model = build_model(ModelConfig(**cfg, norm_impl=impl), device)  # type: ignore[arg-type]
        return model.to(device).to(memory_format=torch.channels_last)

    src = make(saved_with)
    opt = torch.optim.SGD(src.parameters(), lr=0.05)  # move the parameters off their initial values
    for _ in range(steps):
        x = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
        loss = src(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / f"ckpt-{saved_with}.pt"
    torch.save(src.state_dict(), path)
    dst = make(loaded_with)
    missing, unexpected = dst.load_state_dict(torch.load(path, map_location=device), strict=True)
    src.eval()
    dst.eval()
    x = torch.randn(2 * batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = src(x), dst(x)
    return {"max_abs": (a - b).abs().max().item(), "scale": a.abs().max().item(),
            "argmax_agree": (a.argmax(1) == b.argmax(1)).float().mean().item(),
            "keys_equal": list(src.state_dict()) == list(dst.state_dict())}


@pytest.mark.cuda
@needs_cuda
@needs_kernels
@pytest.mark.parametrize("saved_with,loaded_with", [("triton", "modules"), ("modules", "triton")])
def test_gpu_checkpoints_move_between_paths(tmp_path, monkeypatch, saved_with, loaded_with):
    # TF32 convs would add ~1e-3 noise on both sides and hide what this compares: the norm paths.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    r = checkpoint_roundtrip(tmp_path, "cuda", saved_with, loaded_with, resolution=96, batch=4)
    assert r["keys_equal"], r
    assert r["max_abs"] <= 1e-3 * max(1.0, r["scale"]), r
    assert r["argmax_agree"] >= 0.99, r


@pytest.mark.cuda
@needs_cuda
@needs_kernels
def test_gpu_statistics_are_stable():
    assert max(stability("cuda")["stability"].values()) < 1e-3


@pytest.mark.cuda
@needs_cuda
@needs_kernels
def test_gpu_kernel_bench_runs(capsys):
    from bench import kernels

    assert kernels.main(["--shape", "4,96,20,20", "--iters", "2", "--warmup", "1"]) == 0
    assert kernels.main(["--model", "efficientnet-b0", "--batch", "2", "--resolution", "64", "--iters", "1",
                         "--warmup", "1", "--no-per-kernel"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    total = [line for line in lines if line.get("what") == "total"]
    assert len(total) == 1 and total[0]["units"] == 49 and "fused_vs_batchnorm" in total[0], total
    paths = {line.get("path", line.get("what")) for line in lines}
    assert {"copy", "pytorch", "fused", "batchnorm"} <= paths, lines
    fused = next(line for line in lines if line.get("path") == "fused")
    assert fused["fwdbwd_ms"] > 0 and fused["gbs"] > 0 and "speedup_vs_pytorch" in fused


if __name__ == "__main__":
    if "--interpret" in sys.argv:
        interpret_main()
    else:
        sys.exit(pytest.main([__file__, "-v"]))
