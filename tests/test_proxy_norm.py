"""Proxy norm against an independent float64 reference (stdlib quantiles, written out term by term)."""

from statistics import NormalDist

import pytest
import torch

from models.proxy_norm import ProxyNormActivation, normal_quantiles
from numerics import fp_bound, rounding_bound, summed_terms

#: The module keeps its quadrature points in fp32 (one rounding each, of points up to |q| = 2.8 proxy standard
#: deviations out) where the reference computes them in float64: in float64 that rounding is the whole difference.
QUANTILE_ROUNDING = rounding_bound(torch.float32, 1, magnitude=float(normal_quantiles(200).abs().max()))


def reference(x, gamma, beta, proxy_beta, proxy_gamma, eps=0.03, n=200):
    """z = (swish(gamma*x + beta) - m) * s with m, s from the proxy N(proxy_beta, (1+proxy_gamma)^2)."""
    u = torch.tensor([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)], dtype=torch.float64)
    swish = lambda t: t / (1 + torch.exp(-t))  # noqa: E731
    proxy = proxy_beta[:, None] + (1 + proxy_gamma)[:, None] * u[None, :]
    act = swish(gamma[:, None] * proxy + beta[:, None])
    m = act.sum(1) / n
    var = ((act - m[:, None]) ** 2).sum(1) / n
    s = 1 / torch.sqrt(var + eps)
    view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    return (swish(view(gamma) * x + view(beta)) - view(m)) * view(s)


def gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest difference over the reference's largest value."""
    return float((ours.detach().double() - theirs.detach()).abs().max() / theirs.detach().abs().max())


def test_quantiles_are_the_standard_normal_midpoints():
    ours = normal_quantiles(200)
    theirs = [NormalDist().inv_cdf((i + 0.5) / 200) for i in range(200)]
    assert max(abs(a - b) for a, b in zip(ours.tolist(), theirs)) < 1e-10


def test_statistics_at_initialisation():
    pn = ProxyNormActivation(4)
    mean, inv_std = pn.proxy_stats()
    assert torch.allclose(mean, torch.full((4,), 0.2060), atol=5e-4)
    assert torch.allclose(inv_std, torch.full((4,), 1.715), atol=2e-3)


def test_forward_matches_reference_with_random_parameters():
    torch.manual_seed(0)
    pn = ProxyNormActivation(6).double()
    with torch.no_grad():
        for p in pn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    ours = pn(x)
    theirs = reference(x, pn.weight, pn.bias, pn.proxy_bias, pn.proxy_weight)
    assert gap(ours, theirs) <= QUANTILE_ROUNDING


def test_gradients_match_reference():
    torch.manual_seed(1)
    pn = ProxyNormActivation(5)
    with torch.no_grad():
        for p in pn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, 3, 3)
    upstream = torch.randn(2, 5, 3, 3)
    (pn(x.requires_grad_()) * upstream).sum().backward()
    ref_params = [p.detach().double().requires_grad_() for p in (pn.weight, pn.bias, pn.proxy_bias, pn.proxy_weight)]
    xr = x.detach().double().requires_grad_()
    (reference(xr, *ref_params) * upstream.double()).sum().backward()
    bound = fp_bound(torch.float32, summed_terms(pn, x, backward=True))  # fp32 sums against float64 ones
    for ours, theirs in zip((x, pn.weight, pn.bias, pn.proxy_bias, pn.proxy_weight), [xr] + ref_params):
        assert gap(ours.grad, theirs.grad) <= bound


def test_gradcheck_through_the_statistics():
    pn = ProxyNormActivation(3).double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    params = [(0.2 * torch.randn(3, dtype=torch.float64) + offset).requires_grad_() for offset in (1, 0, 0, 0)]
    assert torch.autograd.gradcheck(reference, (x, *params))
    # ...and our module's backward agrees with the reference at the same point.
    with torch.no_grad():
        for dst, src in zip((pn.weight, pn.bias, pn.proxy_bias, pn.proxy_weight), params):
            dst.copy_(src)
    ours = torch.autograd.grad(pn(x).sum(), [x, pn.weight, pn.proxy_weight])
    theirs = torch.autograd.grad(reference(x, *params).sum(), [x, params[0], params[3]])
    for a, b in zip(ours, theirs):
        assert gap(a, b) <= QUANTILE_ROUNDING


def test_modes_center_and_defer_the_scale():
    torch.manual_seed(2)
    full, center = ProxyNormActivation(4), ProxyNormActivation(4, mode="center_only")
    deferred = ProxyNormActivation(4, mode="deferred_scale")
    x = torch.randn(2, 4, 3, 3)
    centered, scale = deferred.forward_deferred(x)
    assert torch.equal(centered, center(x))  # the same ops on the same values
    assert torch.equal(centered * scale.view(1, -1, 1, 1), full(x))


def _randomised(channels: int) -> ProxyNormActivation:
    pn = ProxyNormActivation(channels)
    with torch.no_grad():
        for p in pn.parameters():
            p.copy_(torch.randn(channels) * 0.5)
    return pn


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_statistics_stay_fp32_under_bf16_autocast(device):
    """Autocast must not lower the quadrature: the moments under bf16 autocast equal the fp32 ones exactly, and
    the bf16 output is the fp32 output rounded (to bf16's precision). CUDA's autocast is the one that lowers
    ``addr`` (the op the moments used before), so the CUDA case is the regression test; the CPU case holds the
    same promise for CPU autocast."""
    torch.manual_seed(0)
    pn = _randomised(8).to(device)
    x = torch.randn(2, 8, 5, 5, device=device).bfloat16()
    ref_m, ref_s = pn.proxy_stats()
    ref_out = pn(x.float())
    with torch.autocast(device, dtype=torch.bfloat16):
        m, s = pn.proxy_stats()
        out = pn(x)
    assert m.dtype == s.dtype == torch.float32
    assert torch.equal(m, ref_m) and torch.equal(s, ref_s)
    assert out.dtype == torch.bfloat16
    # five bf16 roundings on the way: x * gamma, + beta, swish, - m, * s (tests/numerics.py)
    assert gap(out.float(), ref_out.double()) <= rounding_bound(torch.bfloat16, 5)


def test_autograd_function_matches_reference_in_float64():
    """The fused Function (models/norm_act.py) against the same independent reference, after an affine-free
    layer norm: output and every gradient (it computes the proxy moments in float64 for float64 parameters)."""
    from models.norm_act import norm_proxy_swish

    torch.manual_seed(4)
    c = 6
    x = torch.randn(3, c, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [(0.3 * torch.randn(c, dtype=torch.float64) + base).requires_grad_() for base in (1, 0, 0, 0)]
    ours = norm_proxy_swish(x, 1, 1e-3, *params, normal_quantiles(200), 0.03, "full")
    normed = torch.nn.functional.group_norm(x, 1, eps=1e-3)
    theirs = reference(normed, *params)
    assert torch.allclose(ours, theirs, atol=1e-10)
    upstream = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad((ours * upstream).sum(), [x, *params]),
                    torch.autograd.grad((theirs * upstream).sum(), [x, *params])):
        assert torch.allclose(a, b, atol=1e-9)
