"""EfficientNet B0-B7 from a declarative block table, with group convs and batch-independent norms.

Read top to bottom: the B0 table and the compound-scaling coefficients, the per-block config the builder derives
from them, the two modules (squeeze-excite and the MBConv block), and the network. One knob, ``group_dim``,
threads through every kxk conv; ``NormSpec`` decides every norm.

Module names are stable split points for IPU pipelines: ``stem``, ``blocks.<stage>.<index>`` (0-based, as in
timm), ``head``, ``classifier``; inside a block ``conv_pw`` (expand), ``norm1``, ``conv_dw`` (group conv),
``norm2``, ``se``, ``conv_pwl`` (project), ``norm3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .config import ModelConfig
from .norms import NormAct, NormSpec, projection_norm


@dataclass(frozen=True)
class StageSpec:
    """One row of the B0 table (paper-notes §1.1)."""

    expand_ratio: int
    kernel: int
    stride: int
    out_channels: int
    repeats: int
    se_ratio: float = 0.25


B0_STAGES = (
    StageSpec(1, 3, 1, 16, 1),
    StageSpec(6, 3, 2, 24, 2),
    StageSpec(6, 5, 2, 40, 2),
    StageSpec(6, 3, 2, 80, 3),
    StageSpec(6, 5, 1, 112, 3),
    StageSpec(6, 5, 2, 192, 4),
    StageSpec(6, 3, 1, 320, 1),
)


@dataclass(frozen=True)
class Scaling:
    """Compound-scaling coefficients of one preset (paper-notes §1.2)."""

    width: float
    depth: float
    resolution: int
    dropout: float


PRESETS: Dict[str, Scaling] = {
    "efficientnet-b0": Scaling(1.0, 1.0, 224, 0.2),
    "efficientnet-b1": Scaling(1.0, 1.1, 240, 0.2),
    "efficientnet-b2": Scaling(1.1, 1.2, 260, 0.3),
    "efficientnet-b3": Scaling(1.2, 1.4, 300, 0.3),
    "efficientnet-b4": Scaling(1.4, 1.8, 380, 0.4),
    "efficientnet-b5": Scaling(1.6, 2.2, 456, 0.4),
    "efficientnet-b6": Scaling(1.8, 2.6, 528, 0.5),
    "efficientnet-b7": Scaling(2.0, 3.1, 600, 0.5),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def round_filters(channels: float, width: float, divisor: int = 8) -> int:
    """TensorFlow's channel rounding: nearest multiple of 8, never more than 10 % below the scaled width."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


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
    """Everything one MBConv block needs, derived from the table by :func:`block_plan`."""

    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel: int
    stride: int
    se_ratio: float
    survival_prob: float

    @property
    def mid_channels(self) -> int:
        return self.in_channels * self.expand_ratio


def block_plan(cfg: ModelConfig, stages: Sequence[StageSpec] = B0_STAGES) -> List[List[BlockConfig]]:
    """Scale the table by the preset (or overridden) width/depth and apply the expand-ratio override."""
    scaling = PRESETS[cfg.name]
    width = cfg.width_mult if cfg.width_mult is not None else scaling.width
    depth = cfg.depth_mult if cfg.depth_mult is not None else scaling.depth
    stage_rows = [
        replace(s, out_channels=round_filters(s.out_channels, width), repeats=round_repeats(s.repeats, depth))
        for s in stages
    ]
    total = sum(s.repeats for s in stage_rows)
    plan: List[List[BlockConfig]] = []
    in_ch, index = round_filters(STEM_CHANNELS, width), 0
    for s in stage_rows:
        expand = s.expand_ratio if s.expand_ratio == 1 or cfg.expand_ratio is None else cfg.expand_ratio
        stage = []
        for i in range(s.repeats):
            # Stochastic depth: survival falls linearly from 1 to ``survival_prob`` over the blocks.
            survival = 1.0 - (1.0 - cfg.survival_prob) * index / total
            stage.append(BlockConfig(in_ch, s.out_channels, expand, s.kernel, s.stride if i == 0 else 1,
                                     s.se_ratio, survival))
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


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand, norm-act], kxk group conv, norm-act, SE, 1x1 project, norm, + residual.

    With proxy norm, the group conv's ``1/std`` scale is folded into the SE gate, as the reference does: the SE
    branch sees the centred activation, and one multiply applies both.
    """

    def __init__(self, block: BlockConfig, norm: NormSpec, group_dim: int):
        super().__init__()
        mid = block.mid_channels
        self.expands = block.expand_ratio != 1
        if self.expands:
            self.conv_pw = conv(block.in_channels, mid, 1)
            self.norm1 = NormAct(norm, mid)
        self.conv_dw = conv(mid, mid, block.kernel, block.stride, groups=group_count(mid, group_dim))
        self.norm2 = NormAct(norm, mid, proxy_mode="deferred_scale")
        self.se = SqueezeExcite(mid, max(1, int(block.in_channels * block.se_ratio)))
        self.conv_pwl = conv(mid, block.out_channels, 1)
        self.norm3 = projection_norm(norm, block.out_channels)
        self.has_residual = block.stride == 1 and block.in_channels == block.out_channels
        self.survival_prob = block.survival_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(self.conv_pw(x)) if self.expands else x
        out, scale = self.norm2.forward_deferred(self.conv_dw(out))
        gate = self.se(out)
        if scale is not None:
            gate = gate * scale.to(gate.dtype).view(1, -1, 1, 1)
        out = self.norm3(self.conv_pwl(out * gate))
        if not self.has_residual:
            return out
        return x + drop_path(out, self.survival_prob, self.training)


def drop_path(x: torch.Tensor, survival_prob: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth; survivors are scaled by ``1/survival_prob`` so the expectation is kept."""
    if not training or survival_prob >= 1.0:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device) < survival_prob
    return x * keep.to(x.dtype) / survival_prob


class EfficientNet(nn.Module):
    def __init__(self, cfg: ModelConfig, stages: Sequence[StageSpec] = B0_STAGES):
        super().__init__()
        cfg.validate()
        scaling = PRESETS[cfg.name]
        width = cfg.width_mult if cfg.width_mult is not None else scaling.width
        norm = NormSpec(cfg.norm, cfg.num_groups, cfg.norm_eps, cfg.proxy_norm)
        plan = block_plan(cfg, stages)
        stem_ch = round_filters(STEM_CHANNELS, width)
        head_ch = round_filters(HEAD_CHANNELS, width)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", conv(cfg.in_channels, stem_ch, 3, 2))
        self.stem.add_module("norm", NormAct(norm, stem_ch))
        self.blocks = nn.Sequential(*[
            nn.Sequential(*[MBConv(b, norm, cfg.group_dim) for b in stage]) for stage in plan
        ])
        self.head = nn.Sequential()
        self.head.add_module("conv", conv(plan[-1][-1].out_channels, head_ch, 1))
        # Global pooling and the classifier follow the head, so its proxy norm only needs to centre.
        self.head.add_module("norm", NormAct(norm, head_ch, proxy_mode="center_only"))
        self.dropout = nn.Dropout(cfg.dropout if cfg.dropout is not None else scaling.dropout)
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
    for s, stage in enumerate(model.blocks):
        names += [f"blocks.{s}.{i}" for i in range(len(stage))]
    return names + ["head", "classifier"]


def native_resolution(name: str) -> int:
    return PRESETS[name].resolution
