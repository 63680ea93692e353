"""EfficientNet B0-B7 and EfficientNetV2 from declarative block tables, with group convs and batch-independent norms.

Read top to bottom: the block tables (V1's B0; V2's base, S, M, L), the per-family architecture and the named
presets, the per-block config the builder derives from them, the modules (squeeze-excite, the MBConv and
Fused-MBConv blocks), and the network. One knob, ``group_dim``, threads through every MBConv kxk conv (V2's fused
convs stay dense); ``NormSpec`` decides every norm.

Module names are stable split points for IPU pipelines: ``stem``, ``blocks.<stage>.<index>`` (0-based, as in
timm), ``head``, ``classifier``; inside an MBConv block ``conv_pw`` (expand), ``norm1``, ``conv_dw`` (group conv),
``norm2``, ``se``, ``conv_pwl`` (project), ``norm3``; inside a Fused-MBConv block ``conv_fused`` (dense kxk),
``norm1``, and when it expands ``conv_pwl``, ``norm3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Literal, Tuple

import torch
from torch import nn

from .config import ModelConfig
from .layout import channel_view
from .norms import NormSpec, norm_act, projection_norm, resolve_norm_impl

BlockType = Literal["mbconv", "fused"]


@dataclass(frozen=True)
class StageSpec:
    """One row of a block table (docs/paper.md, "Block table and compound scaling" for V1, "EfficientNetV2" for V2)."""

    expand_ratio: int
    kernel: int
    stride: int
    out_channels: int
    repeats: int
    se_ratio: float = 0.25
    block: BlockType = "mbconv"

    def __post_init__(self) -> None:
        if self.block == "fused" and self.se_ratio:
            raise ValueError("Fused-MBConv rows need se_ratio 0: EfficientNetV2 has no squeeze-excite there")


B0_STAGES = (
    StageSpec(1, 3, 1, 16, 1),
    StageSpec(6, 3, 2, 24, 2),
    StageSpec(6, 5, 2, 40, 2),
    StageSpec(6, 3, 2, 80, 3),
    StageSpec(6, 5, 1, 112, 3),
    StageSpec(6, 5, 2, 192, 4),
    StageSpec(6, 3, 1, 320, 1),
)


# EfficientNetV2 (google/automl ``effnetv2_configs.py``; torchvision's S/M/L tables are the same): three dense
# Fused-MBConv stages without SE, then MBConv stages with SE 0.25. Columns as in StageSpec.
V2_BASE_STAGES = (
    StageSpec(1, 3, 1, 16, 1, 0.0, "fused"),
    StageSpec(4, 3, 2, 32, 2, 0.0, "fused"),
    StageSpec(4, 3, 2, 48, 2, 0.0, "fused"),
    StageSpec(4, 3, 2, 96, 3),
    StageSpec(6, 3, 1, 112, 5),
    StageSpec(6, 3, 2, 192, 8),
)
V2_S_STAGES = (
    StageSpec(1, 3, 1, 24, 2, 0.0, "fused"),
    StageSpec(4, 3, 2, 48, 4, 0.0, "fused"),
    StageSpec(4, 3, 2, 64, 4, 0.0, "fused"),
    StageSpec(4, 3, 2, 128, 6),
    StageSpec(6, 3, 1, 160, 9),
    StageSpec(6, 3, 2, 256, 15),
)
V2_M_STAGES = (
    StageSpec(1, 3, 1, 24, 3, 0.0, "fused"),
    StageSpec(4, 3, 2, 48, 5, 0.0, "fused"),
    StageSpec(4, 3, 2, 80, 5, 0.0, "fused"),
    StageSpec(4, 3, 2, 160, 7),
    StageSpec(6, 3, 1, 176, 14),
    StageSpec(6, 3, 2, 304, 18),
    StageSpec(6, 3, 1, 512, 5),
)
V2_L_STAGES = (
    StageSpec(1, 3, 1, 32, 4, 0.0, "fused"),
    StageSpec(4, 3, 2, 64, 7, 0.0, "fused"),
    StageSpec(4, 3, 2, 96, 7, 0.0, "fused"),
    StageSpec(4, 3, 2, 192, 10),
    StageSpec(6, 3, 1, 224, 19),
    StageSpec(6, 3, 2, 384, 25),
    StageSpec(6, 3, 1, 640, 7),
)


def round_filters(channels: float, width: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """TensorFlow's channel rounding: nearest multiple of 8, plus 8 if that fell below ``round_limit`` x the width."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < round_limit * scaled:
        rounded += divisor
    return int(rounded)


@dataclass(frozen=True)
class Architecture:
    """A family's unscaled network: the block table and the stem and head widths around it.

    ``round_limit`` is how far channel rounding may fall below the scaled width: V1 adds 8 below 90 %; automl's
    V2 code (and timm's V2 ports) dropped that check, which changes e.g. V2-B3's first stage (16, not 24).
    """

    stages: Tuple[StageSpec, ...]
    stem_channels: int
    head_channels: int = 1280
    round_limit: float = 0.9

    def channels(self, base: int, width: float) -> int:
        return round_filters(base, width, round_limit=self.round_limit)


V1 = Architecture(B0_STAGES, stem_channels=32)
V2_BASE = Architecture(V2_BASE_STAGES, stem_channels=32, round_limit=0.0)
V2_S = Architecture(V2_S_STAGES, stem_channels=24, round_limit=0.0)
V2_M = Architecture(V2_M_STAGES, stem_channels=24, round_limit=0.0)
V2_L = Architecture(V2_L_STAGES, stem_channels=32, round_limit=0.0)


@dataclass(frozen=True)
class Preset:
    """A named model: its architecture, compound-scaling coefficients, train and eval resolutions, dropout.

    V1 trains at its eval resolution (docs/paper.md, "Block table and compound scaling"). V2 trains smaller than it
    evaluates (docs/paper.md, "EfficientNetV2"; B0-B3 as timm's ``tf_efficientnetv2_b*``
    ``input_size``/``test_input_size``); S/M/L are separate tables, not scaled versions of one.
    """

    arch: Architecture
    width: float
    depth: float
    train_resolution: int
    eval_resolution: int
    dropout: float


PRESETS: Dict[str, Preset] = {
    "efficientnet-b0": Preset(V1, 1.0, 1.0, 224, 224, 0.2),
    "efficientnet-b1": Preset(V1, 1.0, 1.1, 240, 240, 0.2),
    "efficientnet-b2": Preset(V1, 1.1, 1.2, 260, 260, 0.3),
    "efficientnet-b3": Preset(V1, 1.2, 1.4, 300, 300, 0.3),
    "efficientnet-b4": Preset(V1, 1.4, 1.8, 380, 380, 0.4),
    "efficientnet-b5": Preset(V1, 1.6, 2.2, 456, 456, 0.4),
    "efficientnet-b6": Preset(V1, 1.8, 2.6, 528, 528, 0.5),
    "efficientnet-b7": Preset(V1, 2.0, 3.1, 600, 600, 0.5),
    "efficientnetv2-b0": Preset(V2_BASE, 1.0, 1.0, 192, 224, 0.2),
    "efficientnetv2-b1": Preset(V2_BASE, 1.0, 1.1, 192, 240, 0.2),
    "efficientnetv2-b2": Preset(V2_BASE, 1.1, 1.2, 208, 260, 0.3),
    "efficientnetv2-b3": Preset(V2_BASE, 1.2, 1.4, 240, 300, 0.3),
    "efficientnetv2-s": Preset(V2_S, 1.0, 1.0, 300, 384, 0.2),
    "efficientnetv2-m": Preset(V2_M, 1.0, 1.0, 384, 480, 0.3),
    "efficientnetv2-l": Preset(V2_L, 1.0, 1.0, 384, 480, 0.4),
}


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def group_count(channels: int, group_dim: int) -> int:
    """Groups of a kxk conv with ``group_dim`` channels each.

    ``channels // group_dim`` as in the paper; when that does not divide the channels (e.g. 56 channels at
    G16 in B6), the largest smaller count that does, so every group has the same width.
    """
    groups = max(channels // group_dim, 1)
    while channels % groups:
        groups -= 1
    return groups


@dataclass(frozen=True)
class BlockConfig:
    """Everything one MBConv or Fused-MBConv block needs, derived from the table by :func:`block_plan`."""

    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel: int
    stride: int
    se_ratio: float
    survival_prob: float
    block: BlockType

    @property
    def mid_channels(self) -> int:
        return self.in_channels * self.expand_ratio


def width_and_depth(cfg: ModelConfig) -> Tuple[float, float]:
    """The preset's scaling coefficients unless the config overrides them."""
    preset = PRESETS[cfg.name]
    return (cfg.width_mult if cfg.width_mult is not None else preset.width,
            cfg.depth_mult if cfg.depth_mult is not None else preset.depth)


def block_plan(cfg: ModelConfig) -> List[List[BlockConfig]]:
    """Scale the preset's table by its (or the overridden) width/depth and apply the expand-ratio override.

    The override replaces the expansion of MBConv stages that expand (V1 stages 2-7). Fused-MBConv stages keep
    the table's: their kxk conv is dense, so its cost grows with the expansion far faster than a group conv's.
    """
    arch = PRESETS[cfg.name].arch
    width, depth = width_and_depth(cfg)
    stage_rows = [
        replace(s, out_channels=arch.channels(s.out_channels, width), repeats=round_repeats(s.repeats, depth))
        for s in arch.stages
    ]
    total = sum(s.repeats for s in stage_rows)
    plan: List[List[BlockConfig]] = []
    in_ch, index = arch.channels(arch.stem_channels, width), 0
    for s in stage_rows:
        # The config's expand ratio replaces the table's, except in fused stages and stages that do not expand.
        expand = (cfg.expand_ratio if cfg.expand_ratio is not None and s.block != "fused" and s.expand_ratio != 1
                  else s.expand_ratio)
        stage = []
        for i in range(s.repeats):
            # Stochastic depth: survival falls linearly from 1 to ``survival_prob`` over the blocks.
            survival = 1.0 - (1.0 - cfg.survival_prob) * index / total
            stage.append(BlockConfig(in_ch, s.out_channels, expand, s.kernel, s.stride if i == 0 else 1,
                                     s.se_ratio, survival, s.block))
            in_ch, index = s.out_channels, index + 1
        plan.append(stage)
    return plan


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # Symmetric k//2 padding gives the same output sizes as TensorFlow's SAME padding at every input size.
    return nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)


class SqueezeExcite(nn.Module):
    """Channel gate ``sigmoid(fc2(swish(fc1(mean_hw(x)))))``; the reduced width is 1/4 of the block *input*."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class ResidualBlock(nn.Module):
    """What both block types share: the identity shortcut (stride 1, same width) with stochastic depth."""

    def __init__(self, block: BlockConfig):
        super().__init__()
        self.has_residual = block.stride == 1 and block.in_channels == block.out_channels
        self.survival_prob = block.survival_prob

    def add_residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.has_residual:
            return out
        return x + drop_path(out, self.survival_prob, self.training)


class MBConv(ResidualBlock):
    """Inverted residual: [1x1 expand, norm-act], kxk group conv, norm-act, SE, 1x1 project, norm, + residual.

    With proxy norm, the group conv's ``1/std`` scale is folded into the SE gate, as the reference does: the SE
    branch sees the centred activation, and one multiply applies both.
    """

    def __init__(self, block: BlockConfig, norm: NormSpec, group_dim: int):
        super().__init__(block)
        mid = block.mid_channels
        self.expands = block.expand_ratio != 1
        if self.expands:
            self.conv_pw = conv(block.in_channels, mid, 1)
            self.norm1 = norm_act(norm, mid)
        self.conv_dw = conv(mid, mid, block.kernel, block.stride, groups=group_count(mid, group_dim))
        self.norm2 = norm_act(norm, mid, proxy_mode="deferred_scale")
        self.se = SqueezeExcite(mid, max(1, int(block.in_channels * block.se_ratio)))
        self.conv_pwl = conv(mid, block.out_channels, 1)
        self.norm3 = projection_norm(norm, block.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(self.conv_pw(x)) if self.expands else x
        out, scale = self.norm2.forward_deferred(self.conv_dw(out))
        gate = self.se(out)
        if scale is not None:
            gate = gate * channel_view(scale.to(gate.dtype))
        return self.add_residual(x, self.norm3(self.conv_pwl(out * gate)))


class FusedMBConv(ResidualBlock):
    """EfficientNetV2's Fused-MBConv: MBConv's 1x1 expand and kxk depthwise conv fused into one dense kxk conv.

    kxk conv, norm-act, [1x1 project, norm], + residual; no squeeze-excite. With expand 1 there is no projection:
    the kxk conv maps in -> out directly. The conv is dense (``group_dim`` does not apply). With proxy norm the kxk
    conv's activation is proxy-normalised in full, since there is no SE gate to fold the scale into; the
    projection norm keeps a scale without shift, as in MBConv.
    """

    def __init__(self, block: BlockConfig, norm: NormSpec):
        super().__init__(block)
        self.projects = block.expand_ratio != 1
        fused_out = block.mid_channels if self.projects else block.out_channels
        self.conv_fused = conv(block.in_channels, fused_out, block.kernel, block.stride)
        self.norm1 = norm_act(norm, fused_out)
        if self.projects:
            self.conv_pwl = conv(fused_out, block.out_channels, 1)
            self.norm3 = projection_norm(norm, block.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(self.conv_fused(x))
        if self.projects:
            out = self.norm3(self.conv_pwl(out))
        return self.add_residual(x, out)


def make_block(block: BlockConfig, norm: NormSpec, group_dim: int) -> ResidualBlock:
    return FusedMBConv(block, norm) if block.block == "fused" else MBConv(block, norm, group_dim)


def drop_path(x: torch.Tensor, survival_prob: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth; survivors are scaled by ``1/survival_prob`` so the expectation is kept.

    The scale goes into the per-sample mask before it meets the activation: one full-size multiply forward and one
    backward (not a multiply and a divide each), with the same mask and arithmetic as torchvision's and timm's.
    """
    if not training or survival_prob >= 1.0:
        return x
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(survival_prob)
    return x * mask.div_(survival_prob)


class EfficientNet(nn.Module):
    """The network of ``cfg``, its norm units built for ``target`` (a torch device type, or ``ipu``):
    ``model.norm_impl``'s ``auto`` is resolved here, once, and :attr:`norm_impl` says to what; ``compiled``:
    torch.compile will trace it."""

    def __init__(self, cfg: ModelConfig, target: str = "cpu", compiled: bool = False):
        super().__init__()
        cfg.validate()
        preset = PRESETS[cfg.name]
        width, _ = width_and_depth(cfg)
        self.norm_impl = resolve_norm_impl(cfg.norm_impl, cfg.norm, target, compiled)
        norm = NormSpec(cfg.norm, cfg.num_groups, cfg.norm_eps, cfg.proxy_norm, impl=self.norm_impl)
        plan = block_plan(cfg)
        stem_ch = preset.arch.channels(preset.arch.stem_channels, width)
        head_ch = preset.arch.channels(preset.arch.head_channels, width)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", conv(cfg.in_channels, stem_ch, 3, 2))
        self.stem.add_module("norm", norm_act(norm, stem_ch))
        self.blocks = nn.Sequential(*[
            nn.Sequential(*[make_block(b, norm, cfg.group_dim) for b in stage]) for stage in plan
        ])
        self.head = nn.Sequential()
        self.head.add_module("conv", conv(plan[-1][-1].out_channels, head_ch, 1))
        # Global pooling and the classifier follow the head, so its proxy norm only needs to centre.
        self.head.add_module("norm", norm_act(norm, head_ch, proxy_mode="center_only"))
        self.dropout = nn.Dropout(cfg.dropout if cfg.dropout is not None else preset.dropout)
        self.classifier = nn.Linear(head_ch, cfg.num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x).mean((2, 3))
        return self.classifier(self.dropout(features))


def init_weights(model: nn.Module) -> None:
    """TensorFlow EfficientNet init: conv ~ N(0, 2/fan_out) with fan_out per group, dense ~ U(+-1/sqrt(out))."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def split_points(model: nn.Module) -> List[str]:
    """Names a pipeline stage may start at, in execution order."""
    names = ["stem"]
    for s, stage in enumerate(model.get_submodule("blocks").children()):
        names += [f"blocks.{s}.{i}" for i, _ in enumerate(stage.children())]
    return names + ["head", "classifier"]


def native_resolution(name: str) -> int:
    """The preset's evaluation resolution: where it is tested and fine-tuned."""
    return PRESETS[name].eval_resolution


def train_resolution(name: str) -> int:
    """The preset's own training resolution (below the evaluation one for V2)."""
    return PRESETS[name].train_resolution
