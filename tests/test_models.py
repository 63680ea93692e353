"""EfficientNet family: exact parameter counts, MACs, structure, batch independence, every preset runs."""

from pathlib import Path
from typing import Tuple

import pytest
import torch
import torchvision
from torch import nn

from conftest import assert_split_points_run_in_order, assert_trains_at
from models import ModelConfig, build_model, param_groups
from models.efficientnet import MBConv, group_count
from models.summary import count_macs
from models.summary import main as summary_main
from numerics import fp_bound, summed_terms
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "models").glob("efficientnet-b*.yml"))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("b", range(8))
def test_original_param_count_equals_torchvision(b):
    ours = build_model(ModelConfig(name=f"efficientnet-b{b}"))
    theirs = getattr(torchvision.models, f"efficientnet_b{b}")(weights=None)
    assert n_params(ours) == n_params(theirs)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_original_b0_equals_torchvision_bit_for_bit(training):
    """B0-G1-BN with torchvision's BN epsilon and its weights, by state-dict order: the same logits to the bit,
    in eval mode and in training mode (batch statistics, and the same drop-path masks and dropout from the same
    seed: stochastic depth draws and scales its per-sample mask as torchvision does)."""
    ours = build_model(ModelConfig(norm_eps=1e-5))
    theirs = torchvision.models.efficientnet_b0(weights=None)
    pairs = list(zip(ours.state_dict(), theirs.state_dict().values()))
    assert len(pairs) == len(theirs.state_dict()) and all(ours.state_dict()[k].shape == v.shape for k, v in pairs)
    ours.load_state_dict(dict(pairs))
    ours.train(training)
    theirs.train(training)
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(1)
    a = ours(x)
    torch.manual_seed(1)
    b = theirs(x)
    assert torch.equal(a, b)


def test_g16_b0_params_and_macs_match_the_paper():
    g16 = build_model(ModelConfig(group_dim=16, expand_ratio=4))
    assert n_params(g16) == pytest.approx(5.91e6, rel=0.01)
    assert count_macs(g16, 224) == pytest.approx(0.635e9, rel=0.02)
    assert count_macs(g16, 160) == pytest.approx(0.325e9, rel=0.02)
    g1 = build_model(ModelConfig())
    assert count_macs(g1, 224) == pytest.approx(0.386e9, rel=0.02)


def test_group_convs_have_16_channels_per_group():
    model = build_model(ModelConfig(group_dim=16, expand_ratio=4))
    blocks = [m for m in model.modules() if isinstance(m, MBConv)]
    for block in blocks:
        assert block.conv_dw.in_channels // block.conv_dw.groups == 16
    # Stage 1 keeps expand 1; stages 2-7 use the override.
    assert not blocks[0].expands and blocks[1].conv_pw.out_channels == 4 * blocks[1].conv_pw.in_channels
    depthwise = build_model(ModelConfig())
    assert all(m.conv_dw.groups == m.conv_dw.in_channels for m in depthwise.modules() if isinstance(m, MBConv))


def test_group_count_keeps_groups_equal_when_channels_do_not_divide():
    assert group_count(64, 16) == 4
    assert group_count(56, 16) == 2  # 56 // 16 = 3 does not divide 56
    assert group_count(8, 16) == 1


def test_proxy_norm_placement():
    model = build_model(ModelConfig(group_dim=16, expand_ratio=4, norm="layer", proxy_norm=True))
    assert model.stem.norm.act.mode == "full"
    assert model.head.norm.act.mode == "center_only"
    block = model.blocks[1][0]
    assert block.norm1.act.mode == "full" and block.norm2.act.mode == "deferred_scale"
    # Norms that feed proxy norm have no affine; the projection norm keeps a scale but no shift.
    assert block.norm1.norm.weight is None and block.norm1.norm.num_groups == 1
    assert block.norm3.norm.weight is None and block.norm3.weight.shape == (block.conv_pwl.out_channels,)
    assert not any(name.startswith("norm3") and name.endswith("bias") for name, _ in block.named_parameters())


def test_split_points_are_module_names_in_execution_order():
    model = build_model(ModelConfig())
    assert "blocks.5.3" in assert_split_points_run_in_order(model)
    modules = dict(model.named_modules())
    assert "blocks.3.0.conv_pw" in modules and "blocks.3.0.conv_dw" in modules


def test_weight_decay_groups_exclude_norm_proxy_and_bias():
    model = build_model(ModelConfig(group_dim=16, expand_ratio=4, norm="layer", proxy_norm=True))
    decay, no_decay = param_groups(model, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    assert "blocks.1.0.conv_dw.weight" in decayed and "classifier.weight" in decayed
    for n in ("stem.norm.act.proxy_weight", "stem.norm.act.proxy_bias", "stem.norm.act.weight",
              "blocks.1.0.norm3.weight", "classifier.bias", "blocks.1.0.se.fc1.bias"):
        assert n in undecayed
    assert len(decayed) + len(undecayed) == len(names)


VARIANTS = {
    "group": dict(norm="group"),
    "layer": dict(norm="layer"),
    "group+pn": dict(norm="group", proxy_norm=True),
    "layer+pn": dict(norm="layer", proxy_norm=True),
}


def _per_sample_vs_batch(cfg: ModelConfig) -> Tuple[float, float]:
    """The largest gap between a batch's outputs and its samples' run one by one, over the largest output, and the
    bound on that gap for the network's sums taken in other orders (tests/numerics.py)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(8, 3, 64, 64)
    together = model(x)
    alone = torch.cat([model(x[i:i + 1]) for i in range(8)])
    gap = ((together - alone).abs().max() / together.abs().max()).item()
    return gap, fp_bound(torch.float32, summed_terms(model, x))


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_independent_norms_give_each_sample_the_same_output(variant):
    cfg = ModelConfig(group_dim=16, expand_ratio=4, dropout=0.0, survival_prob=1.0, **VARIANTS[variant])
    gap, bound = _per_sample_vs_batch(cfg)
    assert gap < bound


def test_batchnorm_model_depends_on_the_batch():
    assert _per_sample_vs_batch(ModelConfig(dropout=0.0, survival_prob=1.0))[0] > 1e-2


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_builds_and_trains_at_two_resolutions(preset):
    cfg = load_config(str(preset))
    # Full width; depth cut to one block per stage so 32 presets stay fast on two CPU cores.
    model = build_model(ModelConfig(**{**cfg.model.__dict__, "depth_mult": 0.01, "num_classes": 10}))
    assert_trains_at(model)


def test_every_preset_config_resolves_to_its_variant():
    assert len(PRESETS) == 32
    for preset in PRESETS:
        cfg = load_config(str(preset)).model
        b, variant = preset.stem.split("-")[1], preset.stem.split("-", 2)[2]
        assert cfg.name == f"efficientnet-{b}"
        assert (cfg.group_dim, cfg.expand_ratio) == ((16, 4) if variant.startswith("g16") else (1, None))
        assert cfg.proxy_norm == variant.endswith("pn")
        assert cfg.norm == {"g1-bn": "batch", "g1-gn": "group", "g16-gn": "group", "g16-ln-pn": "layer"}[variant]


def test_summary_cli_prints_one_json_object(capsys):
    import json

    assert summary_main(["--model", "efficientnet-b0", "--group-dim", "16", "--expand-ratio", "4", "--norm", "layer",
                         "--proxy-norm", "--resolution", "160", "--num-classes", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["macs"] == pytest.approx(0.325e9, rel=0.02)
    assert out["stage_shapes"]["head"] == [1280, 5, 5]
    assert "blocks.5.3" in out["split_points"] and out["params"] > 4e6


def test_summary_cli_rejects_proxy_norm_with_batch_norm(capsys):
    assert summary_main(["--proxy-norm"]) == 2
    assert "proxy_norm" in capsys.readouterr().err
