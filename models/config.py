"""The ``model`` config section: which network, and the paper's three knobs (group size, expansion, norm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

ModelName = Literal[
    "efficientnet-b0", "efficientnet-b1", "efficientnet-b2", "efficientnet-b3",
    "efficientnet-b4", "efficientnet-b5", "efficientnet-b6", "efficientnet-b7",
]


@dataclass
class ModelConfig:
    name: ModelName = field(default="efficientnet-b0", metadata={"help": "architecture preset"})
    group_dim: int = field(default=1, metadata={"min": 1, "help": "channels per group of every kxk conv (1 = depthwise, 16 = G16)"})
    expand_ratio: Optional[int] = field(default=None, metadata={"min": 1, "help": "expansion of stages 2-7 (G16 recipe: 4); null keeps the table's"})
    norm: Literal["batch", "group", "layer"] = field(default="batch", metadata={"help": "layer = GroupNorm with one group"})
    num_groups: int = field(default=4, metadata={"min": 1, "help": "groups of the group norm"})
    norm_eps: float = field(default=1e-3, metadata={"min": 0.0})
    proxy_norm: bool = field(default=False, metadata={"help": "proxy-normalised activations (group/layer only)"})
    num_classes: int = field(default=1000, metadata={"min": 1})
    in_channels: int = field(default=3, metadata={"min": 1})
    width_mult: Optional[float] = field(default=None, metadata={"min": 0.0, "help": "override the preset's width coefficient"})
    depth_mult: Optional[float] = field(default=None, metadata={"min": 0.0, "help": "override the preset's depth coefficient"})
    dropout: Optional[float] = field(default=None, metadata={"min": 0.0, "max": 1.0, "help": "before the classifier; null = preset's"})
    survival_prob: float = field(default=0.8, metadata={"min": 0.0, "max": 1.0, "help": "stochastic depth survival of the last block"})

    def validate(self) -> None:
        if self.proxy_norm and self.norm == "batch":
            raise ValueError("model.proxy_norm: true needs model.norm group or layer, not batch "
                             "(proxy norm replaces batch statistics; it has nothing to do with BatchNorm)")
