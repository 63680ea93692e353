"""Replay a plan of option calls (:mod:`ipu_options.plan`) on a ``poptorch.Options`` object.

The applier is deliberately tiny: it walks the dotted path (``Training.gradientAccumulation``), resolves symbolic
arguments on the ``poptorch`` module (or ``torch`` for dtypes) and calls the setter, so PopTorch's own checks
(types, frozen options) apply unchanged. Options are always built fresh: a frozen object is never touched.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional, Sequence

import torch

from .plan import Call, IpuPhasePlan, New, Symbol, training_calls, validation_calls


def resolve_arg(arg: Any, poptorch: ModuleType) -> Any:
    if isinstance(arg, Symbol):
        parts = arg.split(".")
        obj: Any = torch if parts[0] == "torch" else poptorch
        for part in parts[1:] if parts[0] == "torch" else parts:
            obj = getattr(obj, part)
        return obj
    if isinstance(arg, New):
        obj = getattr(poptorch, arg.cls)()
        apply_calls(obj, arg.calls, poptorch)
        return obj
    if isinstance(arg, dict):
        return {k: resolve_arg(v, poptorch) for k, v in arg.items()}
    if isinstance(arg, list):
        return [resolve_arg(v, poptorch) for v in arg]
    return arg


def apply_calls(opts: Any, calls: Sequence[Call], poptorch: ModuleType) -> Any:
    """Call each ``opts.<path>(*args)`` in order; returns ``opts``."""
    for call in calls:
        *owners, method = call.path.split(".")
        target = opts
        for owner in owners:
            target = getattr(target, owner)
        getattr(target, method)(*[resolve_arg(a, poptorch) for a in call.args])
    return opts


def new_options(poptorch: ModuleType, plan: IpuPhasePlan, popdist: Optional[ModuleType] = None) -> Any:
    """A fresh Options object: ``popdist.poptorch.Options(ipus_per_replica=..)`` under poprun (which sets the
    replication factor and process id itself), else ``poptorch.Options()``."""
    if popdist is not None:
        # The submodule (importing the package alone may not load it). Never call replicationFactor on it.
        return importlib.import_module("popdist.poptorch").Options(ipus_per_replica=plan.ipus_per_replica)
    return poptorch.Options()


def build_options(poptorch: ModuleType, plan: IpuPhasePlan, *, training: bool,
                  popdist: Optional[ModuleType] = None, offline: bool = False) -> Any:
    """The training or validation Options of ``plan``, built from scratch."""
    opts = new_options(poptorch, plan, popdist)
    calls = (training_calls if training else validation_calls)(plan, popdist=popdist is not None, offline=offline)
    return apply_calls(opts, calls, poptorch)
