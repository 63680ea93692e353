"""How far apart two floating-point computations of the same result may be: the one rule every comparison in tests/
derives its bound from.

Why a rule and not a number per test: two computations of the same value that sum in different orders (the Function
and the modules, a fused or folded path, ONNX Runtime, a batch and its samples one by one) agree only to rounding,
and the order a kernel sums in depends on the CPU's vector width (AVX2 or AVX-512), the thread count and what ran
before. A bound tuned on one machine failed on another (``test_the_ipu_traces_the_plain_modules``: 1.36e-5 against
1e-5 on AVX2 kernels). A bound derived from the dtype and the size of the reduction holds on any of them.

The rule
--------
``u`` is the dtype's unit roundoff, half the gap between 1 and the next number: 2^-24 for fp32, 2^-8 for bf16,
2^-11 for fp16, 2^-53 for fp64. Every addition, multiplication or store rounds with a relative error of at most u.

*A sum of n terms.* Each of its n - 1 additions rounds the running partial sum S_k, so the computed sum is off by
``sum_k d_k * S_k`` with ``|d_k| <= u``: at most ``(n - 1) * u * max|S_k|`` in any order (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., section 4.2). That worst case needs every rounding at its largest and of
one sign; real rounding errors take either sign and are close to independent (uniform in [-u, u]: standard deviation
u / sqrt(3)), so they add like a random walk: a standard deviation of at most ``sqrt(n / 3) * u * max|S_k|`` (Higham
section 2.8). Pairwise sums (torch's CPU reductions) do better, ``log2(n) * u``, but only when both sides sum
pairwise; a convolution or matmul sums its K terms in runs whose length the kernel picks for the CPU. The random walk
is the estimate that holds for every order, so it is the one used here. Two computations with independent errors
differ by sqrt(2) times one's standard deviation; the largest of up to 10^6 compared values stays within 5 standard
deviations (P(|z| > 5) = 6e-7). So two computations of one sum of n terms differ by at most::

    5 * sqrt(2/3) * sqrt(n) * u * magnitude      (4.1 * sqrt(n) * u; fp32, n = 4096: 1.6e-5)

where ``magnitude`` is the largest partial sum in the units the test divides by. It is 1 when the test divides by
the result's largest value and the terms are of one sign (a variance) or of random signs (a gradient summed over a
batch); a mean divided by a standard deviation has mean|x| / std.

*Layers.* A network whose layers are normalised (each output rescaled to unit scale) hands each layer's relative
error on with a gain of about 1, and the layers' rounding errors are independent of each other too, so a whole
network adds like one sum of all its layers' terms: ``reduction_size`` is then the sum, over every conv, linear layer
and norm an output passes through, of the terms each one sums (:func:`summed_terms` counts them; with the backward
pass, also the sums of each layer's input and weight gradients).

*Roundings.* Storing a value in a narrower dtype (bf16 autocast's inputs and outputs; its sums stay fp32) rounds it
with a relative error of at most u; k roundings on the way to a result: ``k * u`` (to first order).

What this does not cover: comparisons of computations that are the same by construction (same kernels, same
inputs) are bit-exact and stay ``torch.equal``.
"""

from __future__ import annotations

import copy
import math
from typing import List

import torch
from torch import nn

from models.norms import NormAct, ScaleOnlyNorm
from models.proxy_norm import ProxyNormActivation

#: Standard deviations of the difference of two independent random-walk errors that the largest of up to 10^6
#: compared values stays within (5), times that difference's deviation per sqrt(n) * u (sqrt(2) * sqrt(1/3)).
SPREAD = 5 * math.sqrt(2 / 3)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u: half the gap between 1 and the next representable number (2^-24 for fp32, 2^-8 for bf16)."""
    return torch.finfo(dtype).eps / 2


def fp_bound(dtype: torch.dtype, reduction_size: int, magnitude: float = 1.0) -> float:
    """The largest gap between two computations of one result that sum ``reduction_size`` terms in different orders,
    relative to the scale the test divides by, times ``magnitude`` (the largest partial sum over that scale); the
    module docstring derives it."""
    return SPREAD * math.sqrt(reduction_size) * unit_roundoff(dtype) * magnitude


def rounding_bound(dtype: torch.dtype, roundings: int, magnitude: float = 1.0) -> float:
    """The largest relative gap of a result rounded ``roundings`` times to ``dtype`` from the unrounded one."""
    return roundings * unit_roundoff(dtype) * magnitude


def norm_sums(norm: nn.Module, x: torch.Tensor, backward: bool = False) -> List[int]:
    """The sums a group norm (or a training-mode batch norm) computes on ``x``: mean and variance over a group, and
    backward two more there for x's gradient and one over N*H*W for gamma's (beta's is a sum of the same size)."""
    if isinstance(norm, nn.BatchNorm2d) and not norm.training:
        return []  # it applies its running statistics
    group = x[0].numel() // norm.num_groups if isinstance(norm, nn.GroupNorm) else x[:, 0].numel()
    return [group, group] + ([group, group, x[:, 0].numel()] if backward else [])


def summed_terms(model: nn.Module, x: torch.Tensor, backward: bool = False) -> int:
    """``fp_bound``'s ``reduction_size`` for a whole network on input ``x``: the terms every conv, linear layer,
    group/batch norm and proxy norm sums, added over the layers (with ``backward``, also the sums of their input
    and weight gradients). Counted by hooks in one forward of a copy whose norm units are turned into the plain
    modules (the Function and the Triton kernels compute the same sums, models/norms.py), so the count does not
    depend on ``model.norm_impl``."""
    probe = copy.deepcopy(model)
    sizes: List[int] = []

    for unit in probe.modules():  # the copy's units as plain modules, whose norms the hooks below see
        if isinstance(unit, NormAct):
            unit.__class__ = NormAct
        elif isinstance(unit, ScaleOnlyNorm):
            unit.__class__ = ScaleOnlyNorm

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        batch = inputs[0].shape[0]
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            sizes.append(module.in_channels // module.groups * kernel)  # each output: a dot product
            if backward:  # the input's gradient sums over the outputs it feeds, the weight's over every position
                sizes.extend([module.out_channels // module.groups * kernel, output[0, 0].numel() * batch])
        elif isinstance(module, nn.Linear):
            sizes.extend([module.in_features] + ([module.out_features, batch] if backward else []))
        elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
            sizes.extend(norm_sums(module, inputs[0], backward))
        elif isinstance(module, ProxyNormActivation):  # the proxy's mean and variance over its quadrature points
            sizes.extend([module.quantiles.numel()] * (4 if backward else 2))

    for module in probe.modules():
        module.register_forward_hook(count)
    with torch.no_grad():
        probe(x)
    return sum(sizes)
