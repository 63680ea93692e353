"""Each phase's IPU plan: the IPU rules that span config sections, checked once, before the first step.

:func:`plan_phases` is the IPU half of :func:`train.run_plan.plan_run` (``python -m train`` and its
``--print-config``, ``python -m train.finetune``, ``python -m ipu_options``). For each :class:`~train.phases.Phase`
it takes the ``ipu`` settings the phase runs with (``ipu.finetune`` merged in by the one override rule,
:func:`train.config.merged`), checks what the other sections ask of the IPUs (precision, progressive resizing,
non-finite steps, clipping, gradient accumulation against the pipeline) and resolves an
:class:`~ipu_options.plan.IpuPhasePlan` with the IPU-only rules of :mod:`ipu_options.plan`. :func:`launch_phases`
then fits those plans to how this process was started (poprun's geometry, or one process driving every replica).
The IPU backend only uses the result; it checks nothing again.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Sequence, Tuple

from ipu_options import distributed
from ipu_options.config import PHASE_FIELDS, IpuConfig
from ipu_options.plan import (
    CACHE_ENV,
    IPU_PRECISIONS,
    IpuPhasePlan,
    PlanError,
    check_ipus_per_process,
    resolve_collectives,
    resolve_stages,
)
from models.splits import split_point_names

from .config import Config, ConfigError, merged, source_key
from .phases import Phase

#: PopTorch's optimizers with a ``max_grad_norm`` (its RMSprop has none; docs/ipu.md).
IPU_CLIPPING_OPTIMIZERS = ("sgd", "adamw")


def phase_settings(cfg: Config, phase: Phase) -> Tuple[IpuConfig, Dict[str, str]]:
    """The ``ipu`` settings ``phase`` runs with, and for each per-phase key the config key its value comes from
    (``ipu.finetune.<key>`` where the fine-tune phase sets it, else ``ipu.<key>``)."""
    own = cfg.ipu.finetune if phase.name == "finetune" else None
    keys = {name: source_key(own, name, "ipu.finetune", "ipu") for name in PHASE_FIELDS}
    return (cfg.ipu if own is None else merged(cfg.ipu, own)), keys


def validates_mid_phase(cfg: Config, phase: Phase) -> bool:
    """True when the loop validates before the phase's last epoch (every ``train.validate_every`` epochs): the
    training model is then detached from the IPUs and attached again while it still has steps to run."""
    return cfg.train.validate_every < phase.epochs


def executable_cache(cfg: Config, instances: int) -> Optional[str]:
    """The folder to pass to ``enableExecutableCaching``: ``ipu.executable_cache``; else none when
    ``$POPTORCH_CACHE_DIR`` is set (``poptorch.Options()`` reads it itself); else, for a recipe with several host
    processes, ``<logging.run_dir>/executable-cache``, shared by every instance and by later runs (without a cache
    every poprun instance compiles the same graphs, and PopTorch warns that this can exhaust host memory)."""
    if cfg.ipu.executable_cache:
        return str(cfg.ipu.executable_cache)
    if os.environ.get(CACHE_ENV) or instances == 1:
        return None
    return str(Path(cfg.logging.run_dir) / "executable-cache")


def resolve_phase(cfg: Config, phase: Phase) -> IpuPhasePlan:
    """The validated IPU plan of one phase of ``cfg``; raises PlanError or ConfigError naming the key."""
    finetune = phase.name == "finetune"
    settings, keys = phase_settings(cfg, phase)
    clip, optimizer = phase.optimizer.clip_grad_norm, phase.optimizer.name
    if clip is not None and optimizer not in IPU_CLIPPING_OPTIMIZERS:
        key = "finetune.optimizer.name" if finetune else "optimizer.name"
        raise ConfigError(f"optimizer.clip_grad_norm: {clip} with {key}: {optimizer!r} on IPUs: PopTorch's "
                          f"{optimizer} has no max_grad_norm; use one of {', '.join(IPU_CLIPPING_OPTIMIZERS)} or "
                          "turn clipping off")
    stages = resolve_stages(settings, keys, split_point_names(cfg.model), cfg.model.name)
    n_ipus = stages[-1].ipu + 1
    section = "finetune" if finetune else "train"
    if cfg.precision.compute not in IPU_PRECISIONS:
        raise PlanError(f"precision.compute: {cfg.precision.compute!r} is a torch-backend setting; with "
                        f"train.backend: ipu use one of {', '.join(IPU_PRECISIONS)} (compute.weights)")
    if cfg.train.progressive is not None:
        raise PlanError("train.progressive: progressive resizing changes the input shape within a phase, and "
                        "every shape is a separate IPU executable; use it with train.backend: torch, or the "
                        "two-phase reduced-resolution recipe (train.resolution + finetune) on IPUs")
    ga = phase.gradient_accumulation
    if n_ipus > 1 and ga < 2 * n_ipus - 1:
        raise PlanError(f"{section}.gradient_accumulation: {ga} is too small for a {n_ipus}-stage pipeline "
                        f"({keys['pipeline']}); PopTorch needs at least 2 x stages - 1 = {2 * n_ipus - 1} "
                        "micro-batches per step to fill and drain the pipeline")
    if settings.replicas % settings.instances:
        raise PlanError(f"{keys['replicas']}: {settings.replicas} replicas cannot be split evenly over "
                        f"ipu.instances: {settings.instances} host processes")
    eval_di = settings.eval_device_iterations
    if eval_di is None:
        eval_di = max(settings.device_iterations, n_ipus)
    elif eval_di < n_ipus:
        raise PlanError(f"{keys['eval_device_iterations']}: {eval_di} is below the {n_ipus} pipeline stages; "
                        "an inference pipeline needs at least one device iteration per stage")
    clip_key = source_key(cfg.finetune.optimizer if finetune else None, "clip_grad_norm", "finetune.optimizer",
                          "optimizer")
    merge, notes = resolve_collectives(settings, keys, n_ipus, clip, clip_key)
    plan = IpuPhasePlan(
        phase=phase.name, keys=keys, resolution=phase.resolution, precision=cfg.precision.compute,
        micro_batch_size=phase.micro_batch_size, gradient_accumulation=ga,
        device_iterations=settings.device_iterations, replicas=settings.replicas, instances=settings.instances,
        stages=stages, eval_device_iterations=eval_di,
        eval_micro_batch_size=settings.eval_micro_batch_size or phase.micro_batch_size,
        seed=cfg.train.seed, settings=settings,
        keep_optimizer_state=cfg.checkpoint.optimizer_state or validates_mid_phase(cfg, phase),
        executable_cache=executable_cache(cfg, settings.instances), merge_collectives=merge, notes=notes)
    check_ipus_per_process(plan)
    rws = settings.rebatched_worker_size
    if rws is not None and rws > plan.samples_per_call:
        raise PlanError(f"{keys['rebatched_worker_size']}: {rws} exceeds the {plan.samples_per_call} samples "
                        "of one host call (micro x device iterations x accumulation x local replicas); "
                        "PopTorch requires rebatched_worker_size <= the combined batch")
    return plan


def plan_phases(cfg: Config, phases: Sequence[Phase]) -> Tuple[Phase, ...]:
    """``phases``, each carrying its validated IPU plan (:attr:`Phase.ipu`), as the recipe describes them."""
    if cfg.train.nonfinite == "skip":
        raise ConfigError("train.nonfinite: 'skip' needs train.backend: torch; on IPUs the update happens on the "
                          "device before the host sees the loss, so a step cannot be dropped (use 'stop')")
    return tuple(dataclasses.replace(phase, ipu=resolve_phase(cfg, phase)) for phase in phases)


# ---------------------------------------------------------------------------------------------- the launch
def launch_phases(phases: Sequence[Phase]) -> Tuple[Phase, ...]:
    """``phases`` (from :func:`plan_phases`) with their IPU plans fitted to how this process was started: under
    poprun (``popdist.isPopdistEnvSet()``) the launch fixes replicas, instances and IPUs per replica, and every
    phase must match it; without poprun one process drives every replica. Checked for every phase before the
    first step, so a fine-tune phase that needs its own launch stops the run before the training phase starts."""
    popdist = distributed.popdist_module()
    out = []
    for phase in phases:
        assert phase.ipu is not None, "IPU phases come from plan_phases"
        out.append(dataclasses.replace(phase, ipu=fit_launch(phase.ipu, popdist, len(phases) > 1)))
    return tuple(out)


def fit_launch(plan: IpuPhasePlan, popdist: Optional[ModuleType], several_phases: bool = False) -> IpuPhasePlan:
    """``plan`` as this process runs it (see :func:`launch_phases`); the IPUs one process attaches are checked
    again where the instance count differs from the recipe's. ``several_phases``: the run has phases before the
    fine-tune one (for the advice on a separate fine-tune launch)."""
    if popdist is not None:
        launched = _match_poprun(plan, popdist, several_phases)
        why = f" (poprun launched {launched.instances})"
    elif plan.instances != 1:
        warnings.warn(f"ipu.instances is {plan.instances} but this process was not started by poprun; running "
                      f"all {plan.replicas} replicas here (see docs/ipu.md for the poprun launch)", stacklevel=3)
        launched = dataclasses.replace(plan, instances=1)
        why = " (this process was not started by poprun, so it drives every replica)"
    else:
        return plan
    if launched.instances != plan.instances:  # resolve_phase checked the recipe's split of replicas, not this one
        check_ipus_per_process(launched, why)
    return launched


def _match_poprun(plan: IpuPhasePlan, popdist: ModuleType, several_phases: bool) -> IpuPhasePlan:
    """poprun decides replicas, instances and IPUs per replica; they must match the recipe."""
    total, instances = int(popdist.getNumTotalReplicas()), int(popdist.getNumInstances())
    per_replica = int(popdist.getNumIpusPerReplica())
    hint = ""
    if plan.phase == "finetune":
        first = " (train first with --set finetune.enabled=false)" if several_phases else ""
        hint = (f"; replicas and IPUs per replica are fixed by the poprun launch, so a fine-tune phase with its own "
                f"geometry runs as its own launch{first}: poprun ... --num-replicas {plan.replicas} "
                f"--ipus-per-replica {plan.ipus_per_replica} python -m train.finetune --checkpoint "
                "<run>/checkpoints/train-final.pt")
    if total != plan.replicas:
        raise PlanError(f"{plan.keys['replicas']}: phase {plan.phase!r} asks for {plan.replicas} replicas but poprun "
                        f"launched {total} (--num-replicas); the global batch and learning rate depend on it, so "
                        f"launch with --num-replicas {plan.replicas} or change the recipe{hint}")
    if per_replica != plan.ipus_per_replica:
        raise PlanError(f"{plan.keys['pipeline']}: phase {plan.phase!r} pipelines over {plan.ipus_per_replica} IPUs "
                        f"per replica but poprun was given --ipus-per-replica {per_replica}{hint}")
    if int(popdist.getNumLocalReplicas()) * instances != total:
        raise PlanError(f"poprun split {total} replicas unevenly over {instances} instances")
    if instances != plan.instances:
        warnings.warn(f"ipu.instances is {plan.instances} but poprun launched {instances} instances; using "
                      f"poprun's ({total // instances} replicas per instance)", stacklevel=4)
        return dataclasses.replace(plan, instances=instances)
    return plan
