"""The memory-lean norm Function (models/norm_act.py) on CUDA against the plain modules on CUDA.

The Function has run on CPUs only, so on CUDA ``model.norm_impl: auto`` builds the modules (docs/benchmarks.md,
"The defaults a GPU run decides"). These are the checks a GPU run needs before that can change, as on the CPU
(tests/test_norm_act.py): every unit kind in fp32 within rounding of the modules, in both layouts; under bf16
autocast as close to the fp32 reference as the modules' own bf16 run; a whole (small) model's outputs and gradients.
They skip without CUDA; ``bench/gpu_check.sh`` runs them (``-m cuda``).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from test_norm_act import (
    KINDS,
    LAYOUTS,
    PN_MODEL,
    assert_bf16_as_close_as_the_modules,
    rel_err,
    run,
    unit,
    upstream_for,
)
from torch import nn

from models import ModelConfig, build_model
from numerics import fp_bound, summed_terms

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """TF32 convs and matmuls would add ~1e-3 noise to both paths and hide what is compared: the norm paths."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def on_cuda(kind: str, norm: str, channels: int, path: str) -> nn.Module:
    return unit(kind, norm, channels, path).cuda()


def upstream(module: nn.Module, x: torch.Tensor, seed: int) -> List[torch.Tensor]:
    return [u.cuda() for u in upstream_for(module, x, seed)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", ["layer", "group"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_function_matches_the_modules_on_cuda(kind: str, norm: str, layout: str) -> None:
    """B0's stage-2 width at 40x40 px on the GPU: the Function's outputs and every gradient within fp32 rounding of
    the modules', both on CUDA and given the same (NCHW or channels_last) input."""
    torch.manual_seed(0)
    x = (torch.randn(4, 96, 40, 40, device="cuda") * 2.0 + 0.5).contiguous(memory_format=LAYOUTS[layout])
    lean, ref = on_cuda(kind, norm, 96, "function"), on_cuda(kind, norm, 96, "modules")
    ups = upstream(lean, x, seed=1)
    outs, grads = run(lean, x, ups)
    ref_outs, ref_grads = run(ref, x, ups)
    for o, r in zip(outs, ref_outs):
        assert o.is_cuda and o.dtype == r.dtype and rel_err(o, r) < fp_bound(torch.float32, summed_terms(ref, x))
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name] is not None and grads[name].is_cuda, name
        assert rel_err(grads[name], ref_grads[name]) < fp_bound(torch.float32, summed_terms(ref, x, True)), name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_on_cuda_is_as_close_to_fp32_as_the_modules(kind: str, layout: str) -> None:
    """Under CUDA bf16 autocast (a bf16 conv output in): the Function's output is bf16, its parameter gradients
    fp32 and finite, and all of them as close to the fp32 modules as the modules' own autocast run (or within
    bf16 rounding: CUDA's group norm takes one dtype, so the Function runs it in bf16 where autocast runs the
    modules' GroupNorm in fp32)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 64, 1, bias=False).cuda()
    x = torch.randn(4, 48, 24, 24, device="cuda").contiguous(memory_format=LAYOUTS[layout])
    lean, ref = on_cuda(kind, "layer", 64, "function"), on_cuda(kind, "layer", 64, "modules")
    with torch.no_grad():
        h32 = conv(x)
    ups = upstream(lean, h32, seed=2)
    ref32_outs, ref32_grads = run(ref, h32, ups)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        outs, grads = run(lean, h, ups)
        mod_outs, mod_grads = run(ref, h, ups)
    assert outs[0].dtype == torch.bfloat16
    # CUDA's group norm takes one dtype: the Function's norm output is rounded to bf16 once more.
    assert_bf16_as_close_as_the_modules(outs, grads, mod_outs, mod_grads, ref32_outs, ref32_grads, unit_roundings=1)


def model_step(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1], device=out.device)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm, proxy", [("layer", True), ("group", True), ("group", False)],
                         ids=["layer+pn", "group+pn", "group"])
def test_a_model_on_the_function_matches_the_modules_on_cuda(norm: str, proxy: bool) -> None:
    """A small G16 model in channels_last on the GPU: the same weights on either path give the same outputs and
    gradients, within fp32 rounding."""
    cfg = dict(PN_MODEL, norm=norm, proxy_norm=proxy)
    torch.manual_seed(0)
    lean = build_model(ModelConfig(**cfg, norm_impl="function"), "cuda")
    plain = build_model(ModelConfig(**cfg, norm_impl="modules"), "cuda")
    with torch.no_grad():  # away from the initial values, where some gradients vanish
        for p in lean.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain.load_state_dict(lean.state_dict(), strict=True)
    lean = lean.cuda().to(memory_format=torch.channels_last).train()
    plain = plain.cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    out, grads = model_step(lean, x)
    ref_out, ref_grads = model_step(plain, x)
    assert rel_err(out, ref_out) < fp_bound(torch.float32, summed_terms(plain, x))
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(lean.parameters()))
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < fp_bound(torch.float32, summed_terms(plain, x, True)), name
