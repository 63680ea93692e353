"""EfficientNetV2 (Fused-MBConv) in the shared builder: exact parameter counts, structure, knobs, every preset runs.

Reference counts: torchvision's ``efficientnet_v2_s/m/l(weights=None)`` for S/M/L (the same numbers are in
torchvision's weight metadata: 21,458,488 / 54,139,356 / 118,515,272), and timm's ``tf_efficientnetv2_b0..b3``
(ports of google/automl's ``efficientnetv2-b0..b3``) for B0-B3, since torchvision has no V2-B models.
"""

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from conftest import assert_split_points_run_in_order, assert_trains_at
from models import ModelConfig, build_model, native_resolution, train_resolution
from models.efficientnet import PRESETS, FusedMBConv, MBConv, SqueezeExcite, StageSpec
from models.norms import ScaleOnlyNorm
from models.summary import count_macs
from models.summary import main as summary_main
from numerics import fp_bound, summed_terms
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "models").glob("efficientnetv2-*.yml"))
V2_NAMES = [name for name in PRESETS if name.startswith("efficientnetv2-")]
VARIANTS = ["g1-bn", "g16-ln-pn"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("size", "sml")
def test_param_count_equals_torchvision(size):
    # On the meta device: only shapes matter, and V2-L has 118 M parameters.
    with torch.device("meta"):
        ours = build_model(ModelConfig(name=f"efficientnetv2-{size}"))
        theirs = getattr(torchvision.models, f"efficientnet_v2_{size}")(weights=None)
    assert n_params(ours) == n_params(theirs)


@pytest.mark.slow
@pytest.mark.parametrize("b", range(4))
def test_base_param_count_equals_timm(b):
    timm = pytest.importorskip("timm", reason="timm is a bench-only extra (requirements-bench.txt)")
    ours = build_model(ModelConfig(name=f"efficientnetv2-b{b}"))
    theirs = timm.create_model(f"tf_efficientnetv2_b{b}", pretrained=False)
    assert n_params(ours) == n_params(theirs)


@pytest.mark.parametrize("name", V2_NAMES)
def test_resolutions_match_timm_pretrained_configs(name):
    timm = pytest.importorskip("timm", reason="timm is a bench-only extra (requirements-bench.txt)")
    cfg = timm.models.get_pretrained_cfg(f"tf_{name.replace('-', '_')}.in1k")
    assert train_resolution(name) == cfg.input_size[-1]
    assert native_resolution(name) == cfg.test_input_size[-1]


def test_s_m_l_resolutions_and_dropout_follow_automl():
    expected = {"s": (300, 384, 0.2), "m": (384, 480, 0.3), "l": (384, 480, 0.4)}  # docs/paper.md, "EfficientNetV2"
    for size, (train, test, dropout) in expected.items():
        name = f"efficientnetv2-{size}"
        assert (train_resolution(name), native_resolution(name), PRESETS[name].dropout) == (train, test, dropout)
    assert train_resolution("efficientnet-b0") == native_resolution("efficientnet-b0") == 224


def test_macs_match_the_published_counts():
    # V2-S: torchvision's weight metadata (8.366 GFLOPS at 384); V2-B0: google/automl README (0.72 B at 224).
    with torch.device("meta"):  # shapes are all the hooks need
        assert count_macs(build_model(ModelConfig(name="efficientnetv2-s")), 384) == pytest.approx(8.366e9, rel=1e-3)
        assert count_macs(build_model(ModelConfig(name="efficientnetv2-b0")), 224) == pytest.approx(0.72e9, rel=0.02)


def test_fused_stages_are_dense_without_se_and_mbconv_stages_keep_se():
    with torch.device("meta"):
        model = build_model(ModelConfig(name="efficientnetv2-s"))
    kinds = [type(stage[0]) for stage in model.blocks]
    assert kinds == [FusedMBConv] * 3 + [MBConv] * 3
    for stage in model.blocks:
        for block in stage:
            if isinstance(block, FusedMBConv):
                assert all(m.groups == 1 for m in block.modules() if isinstance(m, nn.Conv2d))
                assert not any(isinstance(m, SqueezeExcite) for m in block.modules())
            else:
                assert block.conv_dw.groups == block.conv_dw.in_channels
                # SE reduced width: 1/4 of the block input, as in V1.
                assert block.se.fc1.out_channels == block.conv_pw.in_channels // 4


def test_expand_one_fused_block_has_no_projection():
    with torch.device("meta"):
        model = build_model(ModelConfig(name="efficientnetv2-s"))
    first, second = model.blocks[0][0], model.blocks[0][1]
    assert not first.projects and not hasattr(first, "conv_pwl") and not hasattr(first, "norm3")
    conv = first.conv_fused
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (24, 24, (3, 3))
    assert first.has_residual and second.has_residual  # 24 -> 24 at stride 1
    expanding = model.blocks[1][0]
    assert expanding.projects and expanding.conv_fused.out_channels == 4 * 24
    assert expanding.conv_pwl.kernel_size == (1, 1) and expanding.conv_pwl.out_channels == 48


def test_group_dim_and_expand_ratio_touch_mbconv_stages_only():
    with torch.device("meta"):
        model = build_model(ModelConfig(name="efficientnetv2-s", group_dim=16, expand_ratio=2))
    for stage in model.blocks:
        for block in stage:
            if isinstance(block, FusedMBConv):
                assert block.conv_fused.groups == 1
                if block.projects:
                    assert block.conv_fused.out_channels == 4 * block.conv_fused.in_channels
            else:
                assert block.conv_dw.in_channels // block.conv_dw.groups == 16
                assert block.conv_pw.out_channels == 2 * block.conv_pw.in_channels


def test_proxy_norm_placement_in_fused_blocks():
    model = build_model(ModelConfig(name="efficientnetv2-b0", width_mult=0.25, depth_mult=0.01,
                                    group_dim=16, expand_ratio=4, norm="layer", proxy_norm=True))
    plain, expanding, mbconv = model.blocks[0][0], model.blocks[1][0], model.blocks[3][0]
    # No SE to fold the scale into: the fused conv's proxy norm applies it in full.
    assert plain.norm1.act.mode == "full" and expanding.norm1.act.mode == "full"
    assert plain.norm1.norm.weight is None and expanding.norm1.norm.weight is None
    assert isinstance(expanding.norm3, ScaleOnlyNorm) and expanding.norm3.norm.weight is None
    assert mbconv.norm2.act.mode == "deferred_scale"


def test_fused_rows_reject_squeeze_excite():
    with pytest.raises(ValueError, match="se_ratio"):
        StageSpec(4, 3, 2, 48, 4, 0.25, "fused")


def test_split_points_are_module_names_in_execution_order():
    model = build_model(ModelConfig(name="efficientnetv2-s", width_mult=0.25, depth_mult=0.2))
    assert "blocks.5.2" in assert_split_points_run_in_order(model)
    modules = dict(model.named_modules())
    for name in ("blocks.0.0.conv_fused", "blocks.0.0.norm1", "blocks.1.0.conv_pwl", "blocks.1.0.norm3",
                 "blocks.3.0.conv_dw", "blocks.3.0.se"):
        assert name in modules


BATCH_INDEPENDENT = {
    "group": dict(norm="group"),
    "layer": dict(norm="layer"),
    "group+pn": dict(norm="group", proxy_norm=True),
    "layer+pn": dict(norm="layer", proxy_norm=True),
}


@pytest.mark.parametrize("variant", BATCH_INDEPENDENT)
def test_batch_independent_norms_give_each_sample_the_same_output(variant):
    # Reduced width; depth 0.51 keeps two blocks in stage 1, so a residual expand-1 fused block is covered.
    cfg = ModelConfig(name="efficientnetv2-s", width_mult=0.25, depth_mult=0.51, group_dim=16, expand_ratio=4,
                      dropout=0.0, survival_prob=1.0, **BATCH_INDEPENDENT[variant])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert len(model.blocks[0]) == 2 and model.blocks[0][1].has_residual
    x = torch.randn(8, 3, 48, 48)
    together = model(x)
    alone = torch.cat([model(x[i:i + 1]) for i in range(8)])
    gap = ((together - alone).abs().max() / together.abs().max()).item()
    assert gap < fp_bound(torch.float32, summed_terms(model, x))  # the same sums in other orders: tests/numerics.py


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", V2_NAMES)
def test_every_preset_builds_and_trains_at_two_resolutions(name, variant):
    knobs = load_config(str(ROOT / "configs" / "models" / "variants" / f"{variant}.yml")).model.__dict__
    # Full width; depth cut to one block per stage for speed on two CPU cores.
    model = build_model(ModelConfig(**{**knobs, "name": name, "depth_mult": 0.01, "num_classes": 10}))
    assert_trains_at(model)


def test_every_v2_config_resolves_to_its_preset_and_variant():
    assert [p.stem for p in CONFIGS] == [f"efficientnetv2-{s}-{v}" for s in "lms" for v in VARIANTS]
    for path in CONFIGS:
        cfg = load_config(str(path)).model
        size, variant = path.stem.split("-")[1], path.stem.split("-", 2)[2]
        assert cfg.name == f"efficientnetv2-{size}"
        assert (cfg.group_dim, cfg.expand_ratio, cfg.norm, cfg.proxy_norm) == (
            (16, 4, "layer", True) if variant == "g16-ln-pn" else (1, None, "batch", False))


def test_summary_cli_reports_v2(capsys):
    assert summary_main(["--model", "efficientnetv2-s", "--resolution", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 21458488
    assert out["stage_shapes"]["blocks.0"] == [24, 32, 32] and out["stage_shapes"]["head"] == [1280, 2, 2]
    assert out["split_points"][:3] == ["stem", "blocks.0.0", "blocks.0.1"] and "blocks.5.14" in out["split_points"]
