"""EfficientNet V1 and V2 families with group convs, batch-independent norms and proxy-normalised activations."""

from typing import Dict, List

from torch import nn

from .config import ModelConfig
from .efficientnet import EfficientNet, native_resolution, split_points, train_resolution
from .exported_file import ExportedModel, ExportError, load_exported
from .folding import inference_form
from .norms import NORM_MODULES


def build_model(cfg: ModelConfig, target: str = "cpu", compiled: bool = False) -> EfficientNet:
    """The network of ``cfg`` with its norm units built for ``target`` (a torch device type, or ``ipu``):
    ``model.norm_impl``'s ``auto`` is resolved here, once; ``norm_impl`` on the result says to what."""
    return EfficientNet(cfg, target, compiled)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two optimizer groups: decayed weights, and undecayed norm, proxy-norm and bias parameters."""
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, NORM_MODULES) for p in m.parameters(recurse=False)}
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["ModelConfig", "build_model", "param_groups", "split_points", "native_resolution", "train_resolution",
           "EfficientNet", "ExportError", "ExportedModel", "inference_form", "load_exported"]
