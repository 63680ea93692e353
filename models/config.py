"""The ``model`` config section: which network, and the paper's three knobs (group size, expansion, norm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

ModelName = Literal[
    "efficientnet-b0", "efficientnet-b1", "efficientnet-b2", "efficientnet-b3",
    "efficientnet-b4", "efficientnet-b5", "efficientnet-b6", "efficientnet-b7",
    "efficientnetv2-b0", "efficientnetv2-b1", "efficientnetv2-b2", "efficientnetv2-b3",
    "efficientnetv2-s", "efficientnetv2-m", "efficientnetv2-l",
]


@dataclass
class ModelConfig:
    name: ModelName = field(default="efficientnet-b0", metadata={"help": "architecture preset"})
    group_dim: int = field(default=1, metadata={
        "min": 1, "help": "channels per group of every MBConv kxk conv (1 = depthwise, 16 = G16); V2's fused convs "
                          "stay dense"})
    expand_ratio: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "expansion of the MBConv stages that expand (V1: 2-7; G16 recipe: 4), not of V2's fused "
                          "stages; null keeps the table's"})
    norm: Literal["batch", "group", "layer"] = field(default="batch", metadata={
        "help": "layer = GroupNorm with one group"})
    num_groups: int = field(default=4, metadata={"min": 1, "help": "groups of the group norm"})
    norm_eps: float = field(default=1e-3, metadata={"min": 0.0, "help": "epsilon of every norm (TensorFlow's 1e-3)"})
    proxy_norm: bool = field(default=False, metadata={"help": "proxy-normalised activations (group/layer only)"})
    num_classes: int = field(default=1000, metadata={"min": 1, "help": "classifier outputs (ImageNet: 1000)"})
    in_channels: int = field(default=3, metadata={"min": 1, "help": "image channels the stem takes"})
    width_mult: Optional[float] = field(default=None, metadata={
        "min": 0.0, "help": "override the preset's width coefficient"})
    depth_mult: Optional[float] = field(default=None, metadata={
        "min": 0.0, "help": "override the preset's depth coefficient"})
    dropout: Optional[float] = field(default=None, metadata={
        "min": 0.0, "max": 1.0, "help": "before the classifier; null = preset's"})
    survival_prob: float = field(default=0.8, metadata={
        "min": 0.0, "max": 1.0, "help": "stochastic depth survival of the last block"})
    fused_norm: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "fused Triton group/layer norm + swish + proxy norm kernels for CUDA: on = use them (error if "
                "impossible); auto and off = the PyTorch modules. auto will pick the kernels on CUDA once they "
                "have passed their tests on a real GPU and won there; so far they have run only in Triton's "
                "interpreter"})
    norm_autograd: Literal["auto", "function", "modules"] = field(default="auto", metadata={
        "help": "the PyTorch path of group/layer norm units: function = one memory-lean autograd Function per norm "
                "+ affine + swish (+ proxy norm) unit (docs/performance.md); modules = the plain modules, one "
                "autograd node per op (what the IPU must trace: PopART differentiates the graph itself and never "
                "runs a custom backward); auto = function on CPU tensors, except while PopTorch traces, under "
                "torch.compile on torch 2.0 (its dynamo cannot trace the Function), or when a unit's "
                "norm/activation module has forward hooks; on CUDA auto keeps the modules until the Function has "
                "run on a GPU. BatchNorm units always run as modules."})

    def validate(self) -> None:
        if self.proxy_norm and self.norm == "batch":
            raise ValueError("model.proxy_norm: true needs model.norm group or layer, not batch "
                             "(proxy norm replaces batch statistics; it has nothing to do with BatchNorm)")
        if self.fused_norm == "on" and self.norm == "batch":
            raise ValueError("model.fused_norm: on needs model.norm group or layer: the fused kernels do not "
                             "cover BatchNorm (use auto or off)")
