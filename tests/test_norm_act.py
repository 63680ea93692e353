"""The memory-lean autograd Functions of the norm units (models/norm_act.py) against the plain modules.

Every mode (plain swish; proxy norm full, deferred scale into SE, centre only), group and layer norm, NCHW and
NHWC: float64 gradcheck of the hand-written backward; fp32 outputs and every gradient against the modules on
real-sized activations; bf16 autocast; checkpoints between the paths; what autograd saves; which path a model is
built with; torch.compile; DDP over two real gloo processes.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import ModelConfig, build_model
from models.norm_act import DYNAMO_TRACES_FUNCTIONS, norm_proxy_swish, norm_swish
from models.norms import (
    FunctionNormAct,
    FunctionScaleOnlyNorm,
    NormAct,
    NormImplError,
    NormSpec,
    ScaleOnlyNorm,
    norm_act,
    projection_norm,
    resolve_norm_impl,
)
from numerics import fp_bound, rounding_bound, summed_terms

KINDS = ["swish", "full", "deferred_scale", "center_only", "scale"]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def unit(kind: str, norm: str, channels: int, path: str, seed: int = 0) -> nn.Module:
    """One norm unit with random (seeded) parameters, built for the CPU with ``model.norm_impl`` ``path``."""
    spec = NormSpec(norm, num_groups=4, eps=1e-3, proxy_norm=kind != "swish", impl=resolve_norm_impl(path, norm))
    module: nn.Module
    if kind == "scale":
        module = projection_norm(spec, channels)
    elif kind == "swish":
        module = norm_act(spec, channels)
    else:
        module = norm_act(spec, channels, proxy_mode=kind)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("weight") and "proxy" not in name else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
    return module


def run(module: nn.Module, x: torch.Tensor, upstream: List[torch.Tensor]):
    """Outputs (a deferred unit gives (centred, s)) and the gradients of sum(out * upstream) w.r.t. x and params."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    outs = list(module.forward_deferred(x)) if getattr(getattr(module, "act", None), "mode", "") == "deferred_scale" \
        else [module(x)]
    sum((o.float() * u).sum() for o, u in zip(outs, upstream)).backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return outs, grads


def upstream_for(module: nn.Module, x: torch.Tensor, seed: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ups = [torch.randn(x.shape, generator=gen)]
    if getattr(getattr(module, "act", None), "mode", "") == "deferred_scale":
        ups.append(torch.randn(x.shape[1], generator=gen))
    return ups


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("mode", [None, "full", "deferred_scale", "center_only"])
def test_gradcheck_float64(mode, groups, layout):
    """The hand-derived backward (x, gamma, beta, beta~, gamma~; and s's gradient in deferred mode) is the
    derivative of the forward."""
    torch.manual_seed(groups)
    c = 4
    x = torch.randn(2, c, 3, 3, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    params = [(0.3 * torch.randn(c, dtype=torch.float64) + base).requires_grad_() for base in (1.0, 0.0, 0.0, 0.0)]
    q = torch.linspace(-2.5, 2.5, 20, dtype=torch.float64)
    # fast mode compares random projections u^T J v of the Jacobians (any wrong column fails it); the full
    # Jacobian once, for the proxy unit with every gradient in play
    fast = not (mode == "full" and groups == 2 and layout == "nhwc")
    if mode is None:
        assert torch.autograd.gradcheck(lambda x, g, b: norm_swish(x, groups, 1e-3, g, b), (x, *params[:2]),
                                        fast_mode=fast)
    else:
        fn = lambda x, g, b, pb, pg: norm_proxy_swish(x, groups, 1e-3, g, b, pb, pg, q, 0.03, mode)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=fast)


# ---------------------------------------------------------------------------------- against the modules
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", ["layer", "group"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_matches_the_modules_on_real_sized_activations(kind, norm, layout):
    """B0's stage-2 width at 40x40 px: outputs and every gradient within fp32 rounding of the modules'.

    The modules see the same values in NCHW: torch 2.0.1's CPU group norm backward crashes (segfault) on a
    channels_last input without affine, which the proxy-normed modules have (the Function always has gamma)."""
    x = torch.randn(4, 96, 40, 40).contiguous(memory_format=LAYOUTS[layout]) * 2.0 + 0.5
    lean, ref = unit(kind, norm, 96, "function"), unit(kind, norm, 96, "modules")
    ups = upstream_for(lean, x, seed=1)
    outs, grads = run(lean, x, ups)
    ref_outs, ref_grads = run(ref, x.contiguous(), ups)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and rel_err(o, r) < fp_bound(torch.float32, summed_terms(ref, x))
    assert outs[0].is_contiguous(memory_format=LAYOUTS[layout])
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < fp_bound(torch.float32, summed_terms(ref, x, True)), name


def assert_bf16_as_close_as_the_modules(outs, grads, mod_outs, mod_grads, ref32_outs, ref32_grads,
                                        unit_roundings: int = 0) -> None:
    """The Function's bf16-autocast outputs and gradients are as close to the fp32 reference as the modules' own bf16
    run is (twice its error), or within bf16 rounding (tests/numerics.py): the output rounds the conv's inputs x and w,
    its output and the unit's output (4); the gradients the conv's three, the upstream gradient entering the bf16
    output and x's gradient (5); plus ``unit_roundings`` where the Function rounds inside the unit. The sums stay
    fp32, and the parameters' gradients are fp32."""
    out_rounding, grad_rounding = (rounding_bound(torch.bfloat16, n + unit_roundings) for n in (4, 5))
    for o, m, r in zip(outs, mod_outs, ref32_outs):
        assert rel_err(o.float(), r) < max(2 * rel_err(m.float(), r), out_rounding)
    for name in grads:
        if name != "x":
            assert grads[name].dtype == torch.float32, name
        assert torch.isfinite(grads[name]).all(), name
        modules_err = rel_err(mod_grads[name].float(), ref32_grads[name])
        assert rel_err(grads[name].float(), ref32_grads[name]) < max(2 * modules_err, grad_rounding), name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_matches_the_fp32_modules(kind, layout):
    """Under CPU bf16 autocast (a bf16 conv output in, fp32 parameters): the Function's output is bf16 in x's
    layout, its gradients fp32 for the parameters, and all of them as close to the fp32 reference as the modules'
    own bf16 run is (or closer: the Function keeps gamma/beta, statistics and reductions in fp32). The modules run
    in NCHW (see the fp32 test)."""
    conv = nn.Conv2d(48, 64, 1, bias=False)
    x = torch.randn(4, 48, 24, 24).contiguous(memory_format=LAYOUTS[layout])
    lean, ref = unit(kind, "layer", 64, "function"), unit(kind, "layer", 64, "modules")
    with torch.no_grad():
        h32 = conv(x)
    ups = upstream_for(lean, h32, seed=2)
    ref32_outs, ref32_grads = run(ref, h32.contiguous(), ups)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        outs, grads = run(lean, h, ups)
        mod_outs, mod_grads = run(ref, h.contiguous(), ups)
    assert outs[0].dtype == torch.bfloat16 and outs[0].is_contiguous(memory_format=LAYOUTS[layout])
    assert_bf16_as_close_as_the_modules(outs, grads, mod_outs, mod_grads, ref32_outs, ref32_grads)


# ------------------------------------------------------------------------------------------------- models
PN_MODEL = dict(group_dim=16, expand_ratio=4, norm="layer", proxy_norm=True, num_classes=10, width_mult=0.5,
                depth_mult=0.1, dropout=0.0, survival_prob=1.0)
MODELS = {"layer+pn": PN_MODEL, "group+pn": {**PN_MODEL, "norm": "group"},
          "group": {**PN_MODEL, "norm": "group", "proxy_norm": False}}


def model_step(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", MODELS)
def test_checkpoints_move_between_the_paths(variant, tmp_path):
    """Same state-dict keys; a checkpoint saved by either path loads strictly into the other, which then
    computes the same outputs and gradients (within fp32 rounding), and back again bit for bit."""
    torch.manual_seed(0)
    lean = build_model(ModelConfig(**MODELS[variant], norm_impl="function")).train()
    plain = build_model(ModelConfig(**MODELS[variant], norm_impl="modules")).train()
    assert list(lean.state_dict()) == list(plain.state_dict())
    with torch.no_grad():  # away from the initial values, where some gradients vanish
        for p in lean.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    torch.save(lean.state_dict(), tmp_path / "lean.pt")
    assert not plain.load_state_dict(torch.load(tmp_path / "lean.pt"), strict=True).missing_keys
    out, grads = model_step(lean, x)
    ref_out, ref_grads = model_step(plain, x)
    assert rel_err(out, ref_out) < fp_bound(torch.float32, summed_terms(plain, x))
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < fp_bound(torch.float32, summed_terms(plain, x, True)), name
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    with torch.no_grad():
        for p in lean.parameters():
            p.zero_()
    lean.load_state_dict(torch.load(tmp_path / "plain.pt"), strict=True)
    assert torch.equal(model_step(lean, x)[0], out)


def saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``fn`` runs."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["swish", "full", "deferred_scale", "center_only", "scale"])
def test_the_function_saves_the_input_and_at_most_the_output(kind):
    """Modules save the input of every op (four to six activations per proxy-norm unit); the Function saves x,
    and in full mode its output too (which the next conv saves anyway); ScaleOnlyNorm saves x only."""
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    lean, plain = unit(kind, "layer", 32, "function"), unit(kind, "layer", 32, "modules")
    fwd = (lambda m: (lambda: m.forward_deferred(x))) if kind == "deferred_scale" else (lambda m: (lambda: m(x)))
    activation = x.numel() * x.element_size()
    lean_bytes, plain_bytes = saved_bytes(fwd(lean)), saved_bytes(fwd(plain))
    assert lean_bytes <= (2 if kind == "full" else 1) * activation + 64 * 1024  # + per-channel/per-group vectors
    assert plain_bytes >= 2 * activation and lean_bytes < plain_bytes


# ----------------------------------------------------------------------------------------------- selection
def test_the_path_is_resolved_once_when_the_model_is_built():
    """``auto``: the Function on the CPU (the modules under torch.compile on torch 2.0), the modules on CUDA and
    the IPU; BatchNorm units are always modules; the IPU refuses the Function. Every unit of a built model is of
    the resolved class, and the model says which."""
    assert resolve_norm_impl("auto", "layer", "cpu") == "function"
    assert resolve_norm_impl("auto", "group", "cpu", compiled=True) == ("function" if DYNAMO_TRACES_FUNCTIONS
                                                                        else "modules")
    assert resolve_norm_impl("auto", "layer", "cuda") == "modules"  # the Function has run on CPUs only
    assert resolve_norm_impl("auto", "layer", "ipu") == resolve_norm_impl("modules", "layer", "cpu") == "modules"
    assert resolve_norm_impl("function", "layer", "cuda") == "function"
    assert resolve_norm_impl("auto", "batch", "cpu") == resolve_norm_impl("function", "batch", "cpu") == "modules"
    with pytest.raises(NormImplError, match="model.norm_impl: function cannot run on the IPU"):
        resolve_norm_impl("function", "layer", "ipu")
    for target, impl, classes in (("cpu", "function", (FunctionNormAct, FunctionScaleOnlyNorm)),
                                  ("ipu", "modules", (NormAct, ScaleOnlyNorm))):
        model = build_model(ModelConfig(**PN_MODEL), target)
        units = [m for m in model.modules() if isinstance(m, (NormAct, ScaleOnlyNorm))]
        assert model.norm_impl == impl and {type(u) for u in units} == set(classes), target
    assert build_model(ModelConfig(**{**PN_MODEL, "norm": "batch", "proxy_norm": False})).norm_impl == "modules"


# ------------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
@pytest.mark.needs_new_torch  # torch 2.0's dynamo: "autograd.Function with requires_grad" (there auto = modules)
@pytest.mark.parametrize("kind", ["full", "deferred_scale"])
def test_torch_compile_traces_the_function_without_graph_breaks(kind):
    """Under ``auto``, dynamo puts the Function itself into one graph (``fullgraph``: a break would raise), and the
    Inductor-compiled forward and backward match eager."""
    assert DYNAMO_TRACES_FUNCTIONS
    lean = unit(kind, "layer", 16, "auto")
    x = torch.randn(2, 16, 8, 8)
    ups = upstream_for(lean, x, seed=3)
    eager_outs, eager_grads = run(lean, x, ups)
    compiled = copy.deepcopy(lean)
    target = compiled.forward_deferred if kind == "deferred_scale" else compiled.forward
    traced: List[str] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(target, fullgraph=True, backend=capture)(x)
    assert any("autograd_function_apply" in t for t in traced) and not any("group_norm" in t for t in traced)
    torch._dynamo.reset()
    compiled_fn = torch.compile(target, fullgraph=True)
    xc = x.clone().requires_grad_()
    outs = compiled_fn(xc)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    sum((o * u).sum() for o, u in zip(outs, ups)).backward()
    for o, e in zip(outs, eager_outs):
        assert rel_err(o.detach(), e.detach()) < fp_bound(torch.float32, summed_terms(lean, x))
    assert rel_err(xc.grad, eager_grads["x"]) < fp_bound(torch.float32, summed_terms(lean, x, True))
    for name, p in compiled.named_parameters():
        assert rel_err(p.grad, eager_grads[name]) < fp_bound(torch.float32, summed_terms(lean, x, True)), name


# ------------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, init_file: str, state: Dict, x: torch.Tensor, out: Dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = build_model(ModelConfig(**PN_MODEL, norm_impl="function")).train()
        model.load_state_dict(state)
        ddp = nn.parallel.DistributedDataParallel(model)
        shard = x.chunk(world)[rank]
        (ddp(shard) * torch.linspace(-1, 1, 10)).sum().backward()
        if rank == 0:
            out.update({n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_on_the_modules(tmp_path):
    """Two DDP processes (the Function path, half the batch each) average their gradients to half of what the
    plain modules give for the whole batch in one process (each loss sums over its half; DDP takes the mean)."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**PN_MODEL, norm_impl="modules")).train()
    x = torch.randn(4, 3, 32, 32)
    _, ref = model_step(plain, x)
    with mp.Manager() as manager:
        out = manager.dict()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), plain.state_dict(), x, out), nprocs=2)
        grads = dict(out)
    assert grads.keys() == ref.keys()
    bound = fp_bound(torch.float32, summed_terms(plain, x, True) + 2)  # + DDP's all-reduce: a sum of two ranks
    for name in ref:
        assert rel_err(grads[name], ref[name] / 2) < bound, name


def test_the_ipu_traces_the_plain_modules(monkeypatch):
    """Contract (fake PopTorch): a model built for the IPU runs the modules under PopTorch, whose graph PopART
    differentiates itself; the same weights built for the CPU run the Function, and both compute the same."""
    import fake_poptorch
    import models.norm_act as norm_act

    poptorch = fake_poptorch.install(monkeypatch)
    calls = []
    real_apply = norm_act._NormSwish.apply
    monkeypatch.setattr(norm_act._NormSwish, "apply", lambda *a: calls.append(1) or real_apply(*a))
    torch.manual_seed(0)
    cfg = ModelConfig(norm="layer", proxy_norm=True, group_dim=16, expand_ratio=4, num_classes=10,
                      width_mult=0.25, depth_mult=0.25)
    model = build_model(cfg).eval()
    for_ipu = build_model(cfg, "ipu").eval()
    for_ipu.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        on_cpu = model(x)
    assert calls, "the CPU run takes the Function"
    calls.clear()
    on_ipu = poptorch.inferenceModel(for_ipu, poptorch.Options())(x)
    assert not calls, "a model built for the IPU must run the plain modules"
    # Both paths compute the same fp32 network with sums in other orders (tests/numerics.py). (An elementwise 1e-5
    # sat at the rounding noise of near-zero logits: it failed on AVX2 kernels, 1.4e-5 against logits up to 4.7.)
    assert rel_err(on_ipu, on_cpu) < fp_bound(torch.float32, summed_terms(for_ipu, x))
