"""PopRun/PopDist detection and the Horovod host-side collectives used with it.

Under ``poprun`` every host process (instance) runs the trainer; PopDist tells it its instance index and its
share of the replicas, the gradients are all-reduced across all instances by the IPUs themselves, and Horovod
(``horovod.torch``, shipped with the Poplar SDK) is used only for host values: the seed and initial weights
broadcast from instance 0, and metric sums. Nothing here imports PopDist or Horovod unless they are installed
and ``popdist.isPopdistEnvSet()`` says we run under poprun.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional

import torch

_STATE: Dict[str, ModuleType] = {}


def _import(name: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def popdist_module() -> Optional[ModuleType]:
    """``popdist`` when running under poprun (initialised once, with Horovod), else None."""
    if "popdist" in _STATE:
        return _STATE["popdist"]
    popdist = _import("popdist")
    if popdist is None or not popdist.isPopdistEnvSet():
        return None
    popdist.init()
    hvd = importlib.import_module("horovod.torch")
    hvd.init()
    _STATE["popdist"], _STATE["hvd"] = popdist, hvd
    return popdist


def horovod() -> ModuleType:
    if "hvd" not in _STATE:
        raise RuntimeError("Horovod is only initialised under poprun (popdist_module() returned None)")
    return _STATE["hvd"]


def reset() -> None:
    """Forget the cached modules (tests install fakes)."""
    _STATE.clear()


def instance_index() -> int:
    popdist = popdist_module()
    return int(popdist.getInstanceIndex()) if popdist is not None else 0


def broadcast_int(value: int) -> int:
    """Instance 0's ``value`` on every instance."""
    if popdist_module() is None:
        return int(value)
    return int(horovod().broadcast(torch.tensor([int(value)], dtype=torch.int64), root_rank=0).item())


def broadcast_weights(module: torch.nn.Module) -> None:
    """Instance 0's parameters and buffers on every instance (before anything is compiled)."""
    if popdist_module() is not None:
        horovod().broadcast_parameters(module.state_dict(), root_rank=0)


def sum_over_instances(values: torch.Tensor) -> torch.Tensor:
    if popdist_module() is None:
        return values
    hvd = horovod()
    return hvd.allreduce(values, op=hvd.Sum)
