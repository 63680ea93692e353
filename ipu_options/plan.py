"""From a resolved config to what PopTorch will be asked, as pure data (no PopTorch needed).

Three steps, each testable on its own:

1. :func:`resolve_phase` merges ``ipu`` with ``ipu.finetune`` for the fine-tune phase, resolves every stage's
   memory proportion and validates the layout against the model *before* anything compiles; every mistake is a
   :class:`PlanError` naming the key (``ipu.pipeline[1].start``), the value and what is allowed.
2. :func:`training_calls` / :func:`validation_calls` turn an :class:`IpuPhasePlan` into an ordered list of option
   calls, e.g. ``Call("Training.gradientAccumulation", (4,))``. Enum arguments are :class:`Symbol` names
   (``"OutputMode.All"``, ``"torch.float16"``) and objects to construct are :class:`New`, so the list is plain
   data: ``python -m ipu_options --describe`` prints it as JSON.
3. :func:`ipu_options.apply.apply_calls` replays a list on a real (or fake) ``poptorch.Options``.

Training and validation get separate lists, as PopTorch requires: validation runs with gradient accumulation 1,
``outputMode(All)`` and at least as many device iterations as pipeline stages.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from models.splits import split_point_names

from .config import PHASE_FIELDS, IpuConfig, PipelineStage

# PopART enums are passed to ``_Popart.set`` as ints (docs/ipu.md, "PopTorch 3.4 facts the code relies on").
RECOMPUTATION_TYPE = {"none": 0, "standard": 1, "norm_only": 2, "pipeline": 3, "recompute_all": 4}
OUTER_FRAGMENT_SCHEDULE = {"scheduler": 0, "serial": 1, "overlap_cycles": 2, "overlap_memory": 3}
#: Other schedules to offer where PopART refuses ``serial`` (see :func:`resolve_collectives`).
NOT_SERIAL = ", ".join(name for name in OUTER_FRAGMENT_SCHEDULE if name != "serial")
IPU_PRECISIONS = ("16.16", "16.32", "fp32")
# PopTorch attaches at most this many IPUs to one process; larger jobs need poprun (see docs/ipu.md).
MAX_IPUS_PER_PROCESS = 64
CACHE_ENV = "POPTORCH_CACHE_DIR"  # read by poptorch.Options() itself


class PlanError(ValueError):
    """An IPU setting PopTorch or the hardware would refuse; names the config key, the value and what is allowed.
    The trainer reports it like any config mistake (one line, exit code 2)."""


def _config_error(message: str) -> PlanError:
    return PlanError(message)


# ------------------------------------------------------------------------------------------- plain-data calls
class Symbol(str):
    """An enum or dtype named by its attribute path: ``OutputMode.All`` on ``poptorch``, ``torch.float16`` on
    ``torch``. A ``str`` so that JSON shows it as the name."""

    __slots__ = ()


@dataclass(frozen=True)
class New:
    """``poptorch.<cls>()`` followed by chained calls, e.g. a ``TensorLocationSettings``."""

    cls: str
    calls: Tuple["Call", ...] = ()

    def to_json(self) -> Dict[str, Any]:
        return {"new": self.cls, "calls": [c.to_json() for c in self.calls]}


@dataclass(frozen=True)
class Call:
    """``opts.<path>(*args)``; ``path`` may go through sub-objects: ``Training.gradientAccumulation``."""

    path: str
    args: Tuple[Any, ...] = ()

    def to_json(self) -> Dict[str, Any]:
        return {"call": self.path, "args": [_json_arg(a) for a in self.args]}


def _json_arg(arg: Any) -> Any:
    if isinstance(arg, New):
        return arg.to_json()
    if isinstance(arg, dict):
        return {k: _json_arg(v) for k, v in arg.items()}
    if isinstance(arg, (list, tuple)):
        return [_json_arg(v) for v in arg]
    return arg


def calls_to_json(calls: Sequence[Call]) -> List[Dict[str, Any]]:
    return [c.to_json() for c in calls]


# ------------------------------------------------------------------------------------------- resolved settings
@dataclass(frozen=True)
class StagePlan:
    index: int
    start: str
    ipu: int
    available_memory_proportion: Optional[float]
    recompute: bool
    modules: Tuple[str, ...]  # split points the stage covers, in order (start first)

    def to_json(self) -> Dict[str, Any]:
        return {"stage": self.index, "ipu": self.ipu, "start": self.start,
                "available_memory_proportion": self.available_memory_proportion, "recompute": self.recompute}


@dataclass(frozen=True)
class IpuPhasePlan:
    """Everything the option builders and the backend need for one phase, validated."""

    phase: str
    prefix: str  # "ipu" or "ipu.finetune": where the phase's own settings come from (for messages)
    resolution: int
    precision: str
    micro_batch_size: int
    gradient_accumulation: int
    device_iterations: int
    replicas: int  # in the whole job
    instances: int
    stages: Tuple[StagePlan, ...]
    eval_device_iterations: int
    eval_micro_batch_size: int
    seed: int
    settings: IpuConfig  # the merged section (phase overrides applied)
    # False only where nothing needs the optimizer state off the device: PopART's optimizer-state streams are then
    # removed (disableOptimizerStateTensorStreams), and checkpoints hold the weights only (see docs/ipu.md).
    keep_optimizer_state: bool = True
    executable_cache: Optional[str] = None  # the folder enableExecutableCaching is given (None: no call)
    # Whether the all-reduces of the replicas are merged (PopART's two merging options; replicas > 1 only), as
    # resolve_collectives decided, and notes on any choice made for the user (--describe shows them).
    merge_collectives: bool = False
    notes: Tuple[str, ...] = ()

    @property
    def ipus_per_process(self) -> int:
        """IPUs one host process attaches: IPUs per replica x that process's replicas."""
        return self.ipus_per_replica * self.local_replicas

    @property
    def local_replicas(self) -> int:
        return self.replicas // self.instances

    @property
    def ipus_per_replica(self) -> int:
        return self.stages[-1].ipu + 1

    @property
    def pipelined(self) -> bool:
        return self.ipus_per_replica > 1

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over the whole job."""
        return self.micro_batch_size * self.gradient_accumulation * self.replicas

    @property
    def samples_per_call(self) -> int:
        """Samples one host process moves per training call (PopTorch's combined batch)."""
        return self.micro_batch_size * self.device_iterations * self.gradient_accumulation * self.local_replicas

    @property
    def micro_batches_per_call(self) -> int:
        return self.device_iterations * self.gradient_accumulation * self.local_replicas

    @property
    def eval_samples_per_call(self) -> int:
        return self.eval_micro_batch_size * self.eval_device_iterations * self.local_replicas

    def memory_proportions(self) -> Dict[str, float]:
        """``{"IPU<n>": p}`` for the IPUs that have one (validated to agree between stages of one IPU)."""
        return {f"IPU{s.ipu}": s.available_memory_proportion for s in self.stages
                if s.available_memory_proportion is not None}

    def to_json(self) -> Dict[str, Any]:
        return {
            "phase": self.phase, "resolution": self.resolution, "precision": self.precision,
            "micro_batch_size": self.micro_batch_size, "gradient_accumulation": self.gradient_accumulation,
            "device_iterations": self.device_iterations, "replicas": self.replicas, "instances": self.instances,
            "local_replicas": self.local_replicas, "ipus_per_replica": self.ipus_per_replica,
            "ipus_per_process": self.ipus_per_process, "ipus": self.ipus_per_replica * self.replicas,
            "global_batch": self.global_batch,
            "samples_per_host_call": self.samples_per_call, "steps_per_host_call": self.device_iterations,
            "stages": [s.to_json() for s in self.stages],
            "optimizer_state_in_checkpoints": self.keep_optimizer_state,
            "executable_cache": self.executable_cache or os.environ.get(CACHE_ENV),
            # PopART's replica settings are set only with several replicas (null: left to PopART and PopTorch).
            "outer_fragment_schedule": self.settings.outer_fragment_schedule if self.replicas > 1 else None,
            "merge_collectives": self.merge_collectives,
            "notes": list(self.notes),
        }


def phase_settings(ipu: IpuConfig, finetune: bool) -> Tuple[IpuConfig, Dict[str, str]]:
    """The section the phase runs with, and for each per-phase field the config key it came from."""
    keys = {name: f"ipu.{name}" for name in PHASE_FIELDS}
    if not finetune or ipu.finetune is None:
        return ipu, keys
    changes = {}
    for name in PHASE_FIELDS:
        value = getattr(ipu.finetune, name)
        if value is not None:
            changes[name] = value
            keys[name] = f"ipu.finetune.{name}"
    return dataclasses.replace(ipu, **changes), keys


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_ipus_per_process(plan: IpuPhasePlan, keys: Dict[str, str], why: str = "") -> None:
    """PopTorch's device rule, on the IPUs one process attaches (IPUs per replica x local replicas): a power of
    two unless ``auto_round_num_ipus`` (PopTorch then rounds the allocation up), and at most 64. PopTorch skips
    the power-of-two rule for offline targets, so ``--compile-only`` alone would not catch it: it is checked here
    for every run (see docs/ipu.md). ``why`` explains an instance count that differs from the config's."""
    per_replica, n = plan.ipus_per_replica, plan.ipus_per_process
    auto = plan.settings.auto_round_num_ipus
    auto_key, replicas_key = keys["auto_round_num_ipus"], keys["replicas"]
    if not auto and not _is_power_of_two(per_replica):
        raise _config_error(f"{keys['pipeline']}: the pipeline uses {per_replica} IPUs per replica, so no number of "
                            "replicas gives a process a power of two of IPUs, which PopTorch needs on hardware; "
                            f"use 1, 2, 4, 8, 16, 32 or 64 IPUs per replica, or {auto_key}: true, which rounds the "
                            "allocation up")
    if n <= MAX_IPUS_PER_PROCESS and (auto or _is_power_of_two(n)):
        return
    choices = [k * plan.instances for k in range(1, MAX_IPUS_PER_PROCESS // per_replica + 1)
               if auto or _is_power_of_two(k * per_replica)]
    where = (f"{replicas_key}: {plan.replicas} over ipu.instances: {plan.instances} host process(es){why} puts "
             f"{plan.local_replicas} replica(s) x {per_replica} IPU(s) = {n} IPUs in one process")
    if n > MAX_IPUS_PER_PROCESS:
        rule = (f"PopTorch attaches at most {MAX_IPUS_PER_PROCESS} IPUs to one process (more need distributed "
                "execution: more poprun instances)")
    else:
        rule = (f"PopTorch attaches a power of two of IPUs to one process on hardware, unless {auto_key}: true "
                "rounds the allocation up")
    allowed = f"{replicas_key} for this layout: {_short_list(map(str, choices))}" if choices else \
        f"no {replicas_key} fits this pipeline in {MAX_IPUS_PER_PROCESS} IPUs"
    raise _config_error(f"{where}; {rule}; valid {allowed}")


def validates_mid_phase(cfg: Any, phase: Any) -> bool:
    """True when the loop validates before the phase's last epoch (every ``train.validate_every`` epochs): the
    training model is then detached from the IPUs and attached again while it still has steps to run."""
    return int(cfg.train.validate_every) < int(phase.epochs)


def executable_cache(cfg: Any, instances: int) -> Optional[str]:
    """The folder to pass to ``enableExecutableCaching``: ``ipu.executable_cache``; else none when
    ``$POPTORCH_CACHE_DIR`` is set (``poptorch.Options()`` reads it itself); else, for a recipe with several host
    processes, ``<logging.run_dir>/executable-cache``, shared by every instance and by later runs (without a cache
    every poprun instance compiles the same graphs, and PopTorch warns that this can exhaust host memory)."""
    if cfg.ipu.executable_cache:
        return str(cfg.ipu.executable_cache)
    if os.environ.get(CACHE_ENV) or instances == 1:
        return None
    return str(Path(cfg.logging.run_dir) / "executable-cache")


def _clip_key(cfg: Any, phase: Any) -> str:
    """Where a phase's ``clip_grad_norm`` comes from: the fine-tune's own key when it sets one."""
    if phase.name == "finetune" and cfg.finetune.optimizer.clip_grad_norm is not None:
        return "finetune.optimizer.clip_grad_norm"
    return "optimizer.clip_grad_norm"


def resolve_collectives(cfg: Any, phase: Any, settings: IpuConfig, keys: Dict[str, str],
                        n_ipus: int) -> Tuple[bool, Tuple[str, ...]]:
    """Whether the replicas' all-reduces are merged, and notes on what was chosen for the user.

    With several replicas the option calls set PopART's outer-fragment schedule (``ipu.outer_fragment_schedule``)
    and, when merging, ``replicatedCollectivesSettings.prepareScheduleForMergingCollectives`` and
    ``mergeAllReduceCollectives``. PopART 3.4 refuses two combinations with the ``serial`` schedule when it
    compiles (docs/ipu.md, "PopTorch 3.4 facts"):

    - preparing the schedule for merged collectives (``transforms/contiguatecollectivesformerging.cpp``): an
      unset ``ipu.merge_collectives`` therefore means off with ``serial``, and an explicit ``true`` is an error;
    - clipping the gradients of a pipeline (``transforms/clipweightgradientsbynorm.cpp``): an error, since the
      user asked for both (PopTorch picks the Scheduler schedule itself only where none is set: one replica).
    """
    merge, clip = settings.merge_collectives, phase.optimizer.clip_grad_norm
    if settings.replicas == 1:
        return False, () if clip is None else (
            "ipu.outer_fragment_schedule: not set with one replica; PopTorch picks Scheduler itself because the "
            f"optimizer clips gradients ({_clip_key(cfg, phase)})",)
    if settings.outer_fragment_schedule != "serial":
        return merge is not False, ()
    where = f"with ipu.outer_fragment_schedule: 'serial' ({keys['replicas']}: {settings.replicas})"
    if merge:
        raise _config_error(f"ipu.merge_collectives: true {where}: PopART refuses to prepare the schedule for "
                            "merged all-reduces (replicatedCollectivesSettings.prepareScheduleForMergingCollectives) "
                            f"under the serial outer-fragment schedule; use another schedule ({NOT_SERIAL}) or "
                            "leave ipu.merge_collectives unset (off with serial)")
    if clip is not None and n_ipus > 1:
        raise _config_error(f"{_clip_key(cfg, phase)}: {clip} {where} on a {n_ipus}-IPU pipeline "
                            f"({keys['pipeline']}): PopART cannot clip the gradients of a pipeline under the serial "
                            f"outer-fragment schedule; use another schedule ({NOT_SERIAL}) or turn clipping off")
    notes = () if merge is False else (
        "ipu.merge_collectives: off (unset): PopART cannot prepare merged all-reduces under "
        "ipu.outer_fragment_schedule: 'serial'",)
    return False, notes


def _short_list(names: Iterable[str]) -> str:
    return ", ".join(names)


def resolve_stages(settings: IpuConfig, keys: Dict[str, str], names: Sequence[str],
                   model_name: str) -> Tuple[StagePlan, ...]:
    """Validate ``pipeline`` against the model's split points and resolve memory proportions."""
    pipe_key = keys["pipeline"]
    amp_key = keys["available_memory_proportion"]
    pipeline: List[PipelineStage] = list(settings.pipeline) or [PipelineStage()]
    default = settings.available_memory_proportion
    if isinstance(default, list) and len(default) != len(pipeline):
        raise _config_error(f"{amp_key}: {default} has {len(default)} values for {len(pipeline)} pipeline "
                            f"stage(s) ({pipe_key}); give one number for all stages or one per stage")
    positions: List[int] = []
    for i, stage in enumerate(pipeline):
        key = f"{pipe_key}[{i}]"
        if stage.start not in names:
            raise _config_error(f"{key}.start: {stage.start!r} is not a split point of {model_name}; valid split "
                                f"points, in execution order: {_short_list(names)}")
        pos = names.index(stage.start)
        if i == 0 and pos != 0:
            raise _config_error(f"{key}.start: {stage.start!r}: the first stage must start at 'stem' (everything "
                                "before the first stage would otherwise land on IPU 0 unannounced)")
        if i > 0 and pos <= positions[-1]:
            raise _config_error(f"{key}.start: {stage.start!r} does not come after {pipeline[i - 1].start!r} "
                                f"({pipe_key}[{i - 1}]); stages must be listed in execution order: "
                                f"{_short_list(names)}")
        positions.append(pos)
        if i == 0 and stage.ipu != 0:
            raise _config_error(f"{key}.ipu: {stage.ipu}: the first stage must run on IPU 0")
        if i > 0 and stage.ipu not in (pipeline[i - 1].ipu, pipeline[i - 1].ipu + 1):
            raise _config_error(f"{key}.ipu: {stage.ipu} after IPU {pipeline[i - 1].ipu} ({pipe_key}[{i - 1}]); "
                                "each stage stays on the previous stage's IPU or moves to the next one (a pipeline "
                                "cannot skip or go back to an IPU)")
    stages = []
    by_ipu: Dict[int, Tuple[float, str]] = {}
    for i, stage in enumerate(pipeline):
        key = f"{pipe_key}[{i}]"
        amp, amp_source = stage.available_memory_proportion, f"{key}.available_memory_proportion"
        if amp is None and default is not None:
            amp = default[i] if isinstance(default, list) else default
            amp_source = f"{amp_key}[{i}]" if isinstance(default, list) else amp_key
        if amp is not None:
            if not 0.0 < amp <= 1.0:
                raise _config_error(f"{amp_source}: {amp} is not in (0, 1]; it is the share of each tile's memory "
                                    "that convolutions and matmuls may use for temporary values")
            if stage.ipu in by_ipu and by_ipu[stage.ipu][0] != amp:
                other_amp, other = by_ipu[stage.ipu]
                raise _config_error(f"{amp_source}: {amp} differs from {other_amp} ({other}) for the same IPU "
                                    f"{stage.ipu}; PopTorch sets available memory per IPU "
                                    "(setAvailableMemoryProportion({'IPU<n>': p})), so stages sharing an IPU "
                                    "must agree")
            by_ipu.setdefault(stage.ipu, (amp, amp_source))
        end = positions[i + 1] if i + 1 < len(pipeline) else len(names)
        stages.append(StagePlan(i, stage.start, stage.ipu, amp, stage.recompute, tuple(names[positions[i]:end])))
    # Stages sharing an IPU inherit each other's proportion (it is per IPU anyway).
    return tuple(dataclasses.replace(s, available_memory_proportion=by_ipu.get(s.ipu, (None,))[0]) for s in stages)


def resolve_phase(cfg: Any, phase: Any) -> IpuPhasePlan:
    """The validated IPU plan of one :class:`train.phases.Phase` of ``cfg``."""
    finetune = phase.name == "finetune"
    settings, keys = phase_settings(cfg.ipu, finetune)
    names = split_point_names(cfg.model)
    stages = resolve_stages(settings, keys, names, cfg.model.name)
    n_ipus = stages[-1].ipu + 1
    section = "finetune" if finetune else "train"
    if cfg.precision.compute not in IPU_PRECISIONS:
        raise _config_error(f"precision.compute: {cfg.precision.compute!r} is a torch-backend setting; with "
                            f"train.backend: ipu use one of {', '.join(IPU_PRECISIONS)} (compute.weights)")
    if getattr(cfg.train, "progressive", None) is not None:
        raise _config_error("train.progressive: progressive resizing changes the input shape within a phase, and "
                            "every shape is a separate IPU executable; use it with train.backend: torch, or the "
                            "two-phase reduced-resolution recipe (train.resolution + finetune) on IPUs")
    ga = phase.gradient_accumulation
    if n_ipus > 1 and ga < 2 * n_ipus - 1:
        raise _config_error(f"{section}.gradient_accumulation: {ga} is too small for a {n_ipus}-stage pipeline "
                            f"({keys['pipeline']}); PopTorch needs at least 2 x stages - 1 = {2 * n_ipus - 1} "
                            "micro-batches per step to fill and drain the pipeline")
    if settings.replicas % settings.instances:
        raise _config_error(f"{keys['replicas']}: {settings.replicas} replicas cannot be split evenly over "
                            f"ipu.instances: {settings.instances} host processes")
    eval_di = settings.eval_device_iterations
    if eval_di is None:
        eval_di = max(settings.device_iterations, n_ipus)
    elif eval_di < n_ipus:
        raise _config_error(f"{keys['eval_device_iterations']}: {eval_di} is below the {n_ipus} pipeline stages; "
                            "an inference pipeline needs at least one device iteration per stage")
    merge, notes = resolve_collectives(cfg, phase, settings, keys, n_ipus)
    plan = IpuPhasePlan(
        phase=phase.name, prefix="ipu.finetune" if finetune and cfg.ipu.finetune is not None else "ipu",
        resolution=phase.resolution, precision=cfg.precision.compute,
        micro_batch_size=phase.micro_batch_size, gradient_accumulation=ga,
        device_iterations=settings.device_iterations, replicas=settings.replicas, instances=settings.instances,
        stages=stages, eval_device_iterations=eval_di,
        eval_micro_batch_size=settings.eval_micro_batch_size or phase.micro_batch_size,
        seed=int(cfg.train.seed), settings=settings,
        keep_optimizer_state=bool(cfg.checkpoint.optimizer_state) or validates_mid_phase(cfg, phase),
        executable_cache=executable_cache(cfg, settings.instances), merge_collectives=merge, notes=notes)
    check_ipus_per_process(plan, keys)
    rws = settings.rebatched_worker_size
    if rws is not None and rws > plan.samples_per_call:
        raise _config_error(f"{keys['rebatched_worker_size']}: {rws} exceeds the {plan.samples_per_call} samples "
                            "of one host call (micro x device iterations x accumulation x local replicas); "
                            "PopTorch requires rebatched_worker_size <= the combined batch")
    return plan


# ---------------------------------------------------------------------------------------------- the builders
def _common_calls(plan: IpuPhasePlan, *, training: bool, popdist: bool, offline: bool,
                  device_iterations: int) -> List[Call]:
    s = plan.settings
    calls: List[Call] = []
    if not popdist:
        # A plain Options() reads OMPI_* variables; this backend distributes only through poprun/popdist.
        calls.append(Call("Distributed.disable"))
        calls.append(Call("replicationFactor", (int(plan.local_replicas),)))
    calls.append(Call("deviceIterations", (int(device_iterations),)))
    if training:
        calls.append(Call("Training.gradientAccumulation", (int(plan.gradient_accumulation),)))
        calls.append(Call("Training.accumulationAndReplicationReductionType", (Symbol("ReductionType.Mean"),)))
    calls.append(Call("outputMode", (Symbol("OutputMode.All"),)))
    calls.append(Call("randomSeed", (int(plan.seed),)))
    if plan.executable_cache:
        calls.append(Call("enableExecutableCaching", (plan.executable_cache,)))
    if s.auto_round_num_ipus:
        calls.append(Call("autoRoundNumIPUs", (True,)))
    if offline:
        calls.append(Call("useOfflineIpuTarget", (int(s.offline_ipu_version),)))
    if s.synthetic_data:
        calls.append(Call("enableSyntheticData", (True,)))
    calls.append(Call("modelName", ("training" if training else "inference",)))
    # Precision. setPartialsType writes convolutionOptions={"partialsType": ..} and dithering would replace
    # that whole dict (_Popart.set replaces values), so the conv options are merged here and set once, last.
    partials = s.partials_type if s.partials_type != "auto" else ("float" if plan.precision == "fp32" else "half")
    calls.append(Call("Precision.setPartialsType", (Symbol("torch.float16" if partials == "half"
                                                           else "torch.float32"),)))
    if training and s.conv_dithering:
        # A string-to-string map, like engineOptions: Poplar parses "true" itself.
        calls.append(Call("_Popart.set", ("convolutionOptions", {"partialsType": partials,
                                                                 "enableConvDithering": "true"})))
    if training:
        calls.append(Call("Precision.enableStochasticRounding", (bool(s.stochastic_rounding),)))
    calls.append(Call("enableStableNorm", (bool(s.stable_norm),)))
    if s.fast_group_norm:
        calls.append(Call("_Popart.set", ("groupNormStridedChannelGrouping", True)))
    amp = plan.memory_proportions()
    if amp:
        calls.append(Call("setAvailableMemoryProportion", (amp,)))
    engine: Dict[str, str] = {"opt.internalExchangeOptimisationTarget": s.exchange_target}
    if s.deterministic_workers:
        engine["target.deterministicWorkers"] = "portable"
    if s.profile_dir:
        # PopVision report through the engine options, merged into the same dict: setting engineOptions twice
        # would drop the first (Graphcore's profile flag silently dropped deterministicWorkers this way).
        engine.update({"autoReport.all": "true", "autoReport.directory": str(s.profile_dir),
                       "profiler.format": "v3"})
    calls.append(Call("_Popart.set", ("engineOptions", engine)))
    return calls


def training_calls(plan: IpuPhasePlan, *, popdist: bool = False, offline: bool = False) -> List[Call]:
    """The option calls of the phase's training model, in order."""
    s = plan.settings
    calls = _common_calls(plan, training=True, popdist=popdist, offline=offline,
                          device_iterations=plan.device_iterations)
    if s.recomputation != "auto":
        calls.append(Call("_Popart.set", ("autoRecomputation", RECOMPUTATION_TYPE[s.recomputation])))
    elif not plan.pipelined and any(st.recompute for st in plan.stages):
        # One IPU: recompute everything but the checkpointed block outputs (pipelines get PopTorch's default).
        calls.append(Call("_Popart.set", ("explicitRecomputation", True)))
        calls.append(Call("_Popart.set", ("autoRecomputation", RECOMPUTATION_TYPE["recompute_all"])))
    if s.offload_optimizer or s.replicated_tensor_sharding:
        location = New("TensorLocationSettings", (Call("useOnChipStorage", (not s.offload_optimizer,)),
                                                  Call("useReplicatedTensorSharding",
                                                       (bool(s.replicated_tensor_sharding),))))
        calls.append(Call("TensorLocations.setOptimizerLocation", (location,)))
    if s.automatic_loss_scaling:
        calls.append(Call("Training.setAutomaticLossScaling", (True,)))
    calls.append(Call("_Popart.set", ("scheduleNonWeightUpdateGradientConsumersEarly", True)))
    calls.append(Call("_Popart.set", ("disableGradAccumulationTensorStreams", True)))
    if not plan.keep_optimizer_state:
        # Graphcore's setting, for speed: the optimizer state then lives only on the device, so it can neither
        # be checkpointed nor survive a detach (resolve_phase allows this only where neither happens; docs/ipu.md).
        calls.append(Call("_Popart.set", ("disableOptimizerStateTensorStreams", True)))
    if plan.replicas > 1:
        calls.append(Call("_Popart.set", ("accumulateOuterFragmentSettings.schedule",
                                          OUTER_FRAGMENT_SCHEDULE[s.outer_fragment_schedule])))
        if plan.merge_collectives:
            calls.append(Call("_Popart.set", ("replicatedCollectivesSettings.prepareScheduleForMergingCollectives",
                                              True)))
            calls.append(Call("_Popart.set", ("replicatedCollectivesSettings.mergeAllReduceCollectives", True)))
    return calls


def validation_calls(plan: IpuPhasePlan, *, popdist: bool = False, offline: bool = False) -> List[Call]:
    """Fresh options for the inference model: no accumulation, every output, device iterations >= stages."""
    return _common_calls(plan, training=False, popdist=popdist, offline=offline,
                         device_iterations=plan.eval_device_iterations)


def constructor(plan: IpuPhasePlan, popdist: bool) -> Dict[str, Any]:
    """How the Options object is created before the calls are replayed."""
    if popdist:
        return {"new": "popdist.poptorch.Options", "kwargs": {"ipus_per_replica": plan.ipus_per_replica}}
    return {"new": "poptorch.Options", "kwargs": {}}


# -------------------------------------------------------------------------------------------------- describe
def needs_own_launch(first: IpuPhasePlan, plan: IpuPhasePlan) -> bool:
    """True when ``plan`` cannot run in the poprun launch of ``first`` (other replicas or IPUs per replica)."""
    return (plan.replicas, plan.ipus_per_replica, plan.instances) != (first.replicas, first.ipus_per_replica,
                                                                      first.instances)


def launch_command(cfg: Any, plan: IpuPhasePlan, config_path: Optional[str], separate: bool = False) -> str:
    """How to start the phase. Under poprun, replicas and IPUs per replica are fixed by the launch: a fine-tune
    phase with another geometry (``separate``) is started on its own from the training phase's checkpoint."""
    config = f" --config {config_path}" if config_path else ""
    if separate:
        target = f"python -m train.finetune --checkpoint <run>/checkpoints/train-final.pt{config}"
    else:
        target = f"python -m train{config}"
    if plan.instances == 1:
        return target
    return (f"poprun --num-instances {plan.instances} --num-replicas {plan.replicas} "
            f"--ipus-per-replica {plan.ipus_per_replica} {target}")


def describe(cfg: Any, phases: Sequence[Any], config_path: Optional[str] = None) -> Dict[str, Any]:
    """One JSON-able document for the ``phases`` of ``cfg``: geometry, stages and the option calls."""
    out: Dict[str, Any] = {"config": cfg.name, "model": cfg.model.name, "backend": cfg.train.backend,
                           "precision": cfg.precision.compute, "loss_scale": cfg.precision.loss_scale,
                           "phases": []}
    first: Optional[IpuPhasePlan] = None
    for phase in phases:
        plan = resolve_phase(cfg, phase)
        first = first or plan
        popdist = plan.instances > 1
        entry = plan.to_json()
        separate = popdist and needs_own_launch(first, plan)
        entry["launch"] = launch_command(cfg, plan, config_path, separate)
        entry["optimizer"] = phase.optimizer.name
        entry["training_options"] = {"constructor": constructor(plan, popdist),
                                     "calls": calls_to_json(training_calls(plan, popdist=popdist))}
        entry["validation"] = {
            "resolutions": list(phase.val_resolutions), "micro_batch_size": plan.eval_micro_batch_size,
            "device_iterations": plan.eval_device_iterations, "samples_per_host_call": plan.eval_samples_per_call,
            "options": {"constructor": constructor(plan, popdist),
                        "calls": calls_to_json(validation_calls(plan, popdist=popdist))},
        }
        out["phases"].append(entry)
    return out


__all__ = ["Call", "IpuPhasePlan", "New", "PlanError", "StagePlan", "Symbol", "calls_to_json", "check_ipus_per_process",
           "constructor", "describe", "executable_cache", "launch_command", "needs_own_launch", "phase_settings",
           "resolve_collectives", "resolve_phase", "resolve_stages", "training_calls", "validates_mid_phase",
           "validation_calls"]
