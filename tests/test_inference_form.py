"""The inference form (models/folding.py) computes the training form's eval output with proxy norm frozen and
BatchNorm / proxy-norm affines folded, for every norm variant and both block types."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from torch import nn

from conftest import assert_split_points_run_in_order
from models import ModelConfig, build_model, inference_form, split_points
from models.folding import NormSiLU
from models.proxy_norm import ProxyNormActivation
from numerics import fp_bound, summed_terms

#: The issue's variants at full size, plus reduced ones whose first block has a residual (the stem's affine must
#: then stay in the stem) and V2-S's stages.
VARIANTS: Dict[str, Dict] = {
    "b0-g1-bn": dict(norm="batch"),
    "b0-g16-gn": dict(norm="group", group_dim=16, expand_ratio=4),
    "b0-g16-ln-pn": dict(norm="layer", proxy_norm=True, group_dim=16, expand_ratio=4),
    "v2-b0-g16-ln-pn": dict(name="efficientnetv2-b0", norm="layer", proxy_norm=True, group_dim=16),
    "v2-b0-g1-bn": dict(name="efficientnetv2-b0", norm="batch"),
    "b0-ln-pn-narrow": dict(norm="layer", proxy_norm=True, width_mult=0.25, depth_mult=0.25),
    "v2-s-gn-pn-narrow": dict(name="efficientnetv2-s", norm="group", proxy_norm=True, group_dim=16,
                              width_mult=0.25, depth_mult=0.25, num_groups=2),
}


def trained_like(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """A network whose norms and proxy norms are far from their initial values, as after training: per-channel
    gamma/beta, proxy parameters and BatchNorm running statistics all drawn at random."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("proxy_weight", "proxy_bias")):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


def relative_gap(reference: torch.Tensor, got: torch.Tensor) -> float:
    return float((reference - got).abs().max() / reference.abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_folded_form_matches_training_form_eval(variant):
    cfg = ModelConfig(num_classes=10, **VARIANTS[variant])
    model = trained_like(cfg)
    if cfg.proxy_norm:  # the check means something only if proxy norm is far from the identity
        mean, inv_std = next(m for m in model.modules() if isinstance(m, ProxyNormActivation)).proxy_stats()
        assert mean.abs().max() > 0.05 and (inv_std - 1).abs().max() > 0.05
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = inference_form(model)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, got = model(images), folded(images)
    # Folding rounds each folded weight once more and may reorder the sums: as a sum of the same terms in another
    # order (tests/numerics.py).
    assert relative_gap(reference, got) <= fp_bound(torch.float32, summed_terms(model, images))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the trained model is untouched


def test_folding_removes_batch_norm_and_the_proxy_norm_quadrature():
    for variant in ("b0-g1-bn", "b0-g16-ln-pn", "v2-b0-g16-ln-pn"):
        cfg = ModelConfig(num_classes=10, **VARIANTS[variant])
        folded = inference_form(trained_like(cfg))
        kinds = {type(m) for m in folded.modules()}
        assert nn.BatchNorm2d not in kinds and ProxyNormActivation not in kinds
        assert not any("quantiles" in name for name, _ in folded.named_buffers())
        # Where a proxy-norm affine could not be folded (before a padded kxk conv) only the centring is left.
        leftovers = [m for m in folded.modules() if isinstance(m, NormSiLU) and m.scale is not None]
        if cfg.proxy_norm:
            assert all(m.shift is not None for m in leftovers)


def test_proxy_norm_scale_is_folded_into_the_group_conv_and_the_projection():
    """In an MBConv of B0-G16-LN+PN the group conv's input is only centred (its scale went into the kxk weights) and
    the deferred SE scale is in the projection's weights: nothing of proxy norm runs as a multiply."""
    cfg = ModelConfig(num_classes=10, **VARIANTS["b0-g16-ln-pn"])
    folded = inference_form(trained_like(cfg))
    block = folded.blocks[2][1]
    assert block.act1.scale is None and block.act1.shift is not None
    assert block.act2.scale is None and block.act2.shift is None
    assert block.gate_correction is not None
    assert folded.head.act.scale is None and folded.head.act.shift is None  # -m went into the classifier bias


def test_inference_form_keeps_the_split_points():
    cfg = ModelConfig(num_classes=10, **VARIANTS["b0-g16-ln-pn"])
    model = trained_like(cfg)
    folded = inference_form(model)
    assert split_points(folded) == split_points(model)
    assert assert_split_points_run_in_order(folded, resolution=32) == split_points(model)


def test_inference_form_refuses_other_networks():
    with pytest.raises(TypeError, match="EfficientNet"):
        inference_form(nn.Sequential(nn.Conv2d(3, 8, 3)))
