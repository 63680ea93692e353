"""The ``model`` config section: which network, and the paper's three knobs (group size, expansion, norm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple, get_args

ModelName = Literal[
    "efficientnet-b0", "efficientnet-b1", "efficientnet-b2", "efficientnet-b3",
    "efficientnet-b4", "efficientnet-b5", "efficientnet-b6", "efficientnet-b7",
    "efficientnetv2-b0", "efficientnetv2-b1", "efficientnetv2-b2", "efficientnetv2-b3",
    "efficientnetv2-s", "efficientnetv2-m", "efficientnetv2-l",
]

NormKind = Literal["batch", "group", "layer"]
#: How the group/layer norm units compute (models/norms.py); ``auto`` is resolved once, when the model is built.
NormImpl = Literal["auto", "modules", "function", "triton"]
NORM_IMPLS: Tuple[str, ...] = get_args(NormImpl)


@dataclass
class ModelConfig:
    name: ModelName = field(default="efficientnet-b0", metadata={"help": "architecture preset"})
    group_dim: int = field(default=1, metadata={
        "min": 1, "help": "channels per group of every MBConv kxk conv (1 = depthwise, 16 = G16); V2's fused convs "
                          "stay dense"})
    expand_ratio: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "expansion of the MBConv stages that expand (V1: 2-7; G16 recipe: 4), not of V2's fused "
                          "stages; null keeps the table's"})
    norm: NormKind = field(default="batch", metadata={
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
    norm_impl: NormImpl = field(default="auto", metadata={
        "help": "how the group/layer norm units compute, fixed when the model is built: modules = the plain "
                "modules, one autograd node per op (what the IPU traces: PopART differentiates the graph itself); "
                "function = one memory-lean autograd Function per norm + affine + swish (+ proxy norm) unit "
                "(docs/performance.md); triton = the fused Triton kernels, CUDA only, experimental (they have run "
                "only in Triton's interpreter so far); auto = function on the CPU (modules under torch.compile on "
                "torch 2.0, whose dynamo cannot trace it), modules on CUDA and the IPU, never triton. BatchNorm "
                "units always run as modules"})
    def validate(self) -> None:
        check_norm(self.norm, self.proxy_norm, self.norm_impl)


def check_norm(kind: NormKind, proxy_norm: bool, impl: NormImpl) -> None:
    """The rules the norm settings obey together, for the config and every norm spec built without one."""
    if proxy_norm and kind == "batch":
        raise ValueError("model.proxy_norm: true needs model.norm group or layer, not batch "
                         "(proxy norm replaces batch statistics; it has nothing to do with BatchNorm)")
    if impl == "triton" and kind == "batch":
        raise ValueError("model.norm_impl: triton needs model.norm group or layer: the fused kernels do not "
                         "cover BatchNorm (use auto, modules or function)")


def stored_model_config(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A model config as stored by an earlier version (a checkpoint's, an exported file's) in today's keys:
    ``fused_norm`` (auto/on/off) and ``norm_autograd`` (auto/function/modules) became ``norm_impl``."""
    if "fused_norm" not in raw and "norm_autograd" not in raw:
        return raw
    out = {k: v for k, v in raw.items() if k not in ("fused_norm", "norm_autograd")}
    out["norm_impl"] = "triton" if raw.get("fused_norm") == "on" else raw.get("norm_autograd", "auto")
    return out
