"""What PopTorch will be asked, as pure data (no PopTorch needed), typed against the ``ipu`` section alone.

- :class:`IpuPhasePlan`: one phase's validated IPU settings. ``train/ipu_plan.py`` builds it from a ``Config`` and
  a ``Phase`` (the rules that span sections); the IPU-only rules it uses live here: :func:`resolve_stages` (the
  pipeline against the model's split points, memory proportions), :func:`resolve_collectives` (PopART's
  outer-fragment schedule and merged all-reduces) and :func:`check_ipus_per_process` (PopTorch's device rule).
  Every mistake is a :class:`PlanError` naming the key (``ipu.pipeline[1].start``), the value and what is allowed.
- :func:`training_calls` / :func:`validation_calls` turn a plan into an ordered list of option calls, e.g.
  ``Call("Training.gradientAccumulation", (4,))``. Enum arguments are :class:`Symbol` names (``"OutputMode.All"``,
  ``"torch.float16"``) and objects to construct are :class:`New`, so the list is plain data:
  ``python -m ipu_options --describe`` prints it as JSON.
- :func:`ipu_options.apply.apply_calls` replays a list on a real (or fake) ``poptorch.Options``.

Training and validation get separate lists, as PopTorch requires: validation runs with gradient accumulation 1,
``outputMode(All)`` and at least as many device iterations as pipeline stages.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .config import IpuConfig, PipelineStage

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
    keys: Dict[str, str]  # each per-phase setting's config key ("ipu.replicas", "ipu.finetune.pipeline"; messages)
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


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_ipus_per_process(plan: IpuPhasePlan, why: str = "") -> None:
    """PopTorch's device rule, on the IPUs one process attaches (IPUs per replica x local replicas): a power of
    two unless ``auto_round_num_ipus`` (PopTorch then rounds the allocation up), and at most 64. PopTorch skips
    the power-of-two rule for offline targets, so ``--compile-only`` alone would not catch it: it is checked here
    for every run (see docs/ipu.md). ``why`` explains an instance count that differs from the config's."""
    per_replica, n = plan.ipus_per_replica, plan.ipus_per_process
    auto, keys = plan.settings.auto_round_num_ipus, plan.keys
    auto_key, replicas_key = keys["auto_round_num_ipus"], keys["replicas"]
    if not auto and not _is_power_of_two(per_replica):
        raise PlanError(f"{keys['pipeline']}: the pipeline uses {per_replica} IPUs per replica, so no number of "
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
    raise PlanError(f"{where}; {rule}; valid {allowed}")


def resolve_collectives(settings: IpuConfig, keys: Dict[str, str], n_ipus: int, clip: Optional[float],
                        clip_key: str) -> Tuple[bool, Tuple[str, ...]]:
    """Whether the replicas' all-reduces are merged, and notes on what was chosen for the user; ``clip`` is the
    phase's ``clip_grad_norm`` and ``clip_key`` the config key it comes from.

    With several replicas the option calls set PopART's outer-fragment schedule (``ipu.outer_fragment_schedule``)
    and, when merging, ``replicatedCollectivesSettings.prepareScheduleForMergingCollectives`` and
    ``mergeAllReduceCollectives``. PopART 3.4 refuses two combinations with the ``serial`` schedule when it
    compiles (docs/ipu.md, "PopTorch 3.4 facts"):

    - preparing the schedule for merged collectives (``transforms/contiguatecollectivesformerging.cpp``): an
      unset ``ipu.merge_collectives`` therefore means off with ``serial``, and an explicit ``true`` is an error;
    - clipping the gradients of a pipeline (``transforms/clipweightgradientsbynorm.cpp``): an error, since the
      user asked for both (PopTorch picks the Scheduler schedule itself only where none is set: one replica).
    """
    merge = settings.merge_collectives
    if settings.replicas == 1:
        return False, () if clip is None else (
            "ipu.outer_fragment_schedule: not set with one replica; PopTorch picks Scheduler itself because the "
            f"optimizer clips gradients ({clip_key})",)
    if settings.outer_fragment_schedule != "serial":
        return merge is not False, ()
    where = f"with ipu.outer_fragment_schedule: 'serial' ({keys['replicas']}: {settings.replicas})"
    if merge:
        raise PlanError(f"ipu.merge_collectives: true {where}: PopART refuses to prepare the schedule for "
                        "merged all-reduces (replicatedCollectivesSettings.prepareScheduleForMergingCollectives) "
                        f"under the serial outer-fragment schedule; use another schedule ({NOT_SERIAL}) or "
                        "leave ipu.merge_collectives unset (off with serial)")
    if clip is not None and n_ipus > 1:
        raise PlanError(f"{clip_key}: {clip} {where} on a {n_ipus}-IPU pipeline "
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
        raise PlanError(f"{amp_key}: {default} has {len(default)} values for {len(pipeline)} pipeline "
                        f"stage(s) ({pipe_key}); give one number for all stages or one per stage")
    positions: List[int] = []
    for i, stage in enumerate(pipeline):
        key = f"{pipe_key}[{i}]"
        if stage.start not in names:
            raise PlanError(f"{key}.start: {stage.start!r} is not a split point of {model_name}; valid split "
                            f"points, in execution order: {_short_list(names)}")
        pos = names.index(stage.start)
        if i == 0 and pos != 0:
            raise PlanError(f"{key}.start: {stage.start!r}: the first stage must start at 'stem' (everything "
                            "before the first stage would otherwise land on IPU 0 unannounced)")
        if i > 0 and pos <= positions[-1]:
            raise PlanError(f"{key}.start: {stage.start!r} does not come after {pipeline[i - 1].start!r} "
                            f"({pipe_key}[{i - 1}]); stages must be listed in execution order: "
                            f"{_short_list(names)}")
        positions.append(pos)
        if i == 0 and stage.ipu != 0:
            raise PlanError(f"{key}.ipu: {stage.ipu}: the first stage must run on IPU 0")
        if i > 0 and stage.ipu not in (pipeline[i - 1].ipu, pipeline[i - 1].ipu + 1):
            raise PlanError(f"{key}.ipu: {stage.ipu} after IPU {pipeline[i - 1].ipu} ({pipe_key}[{i - 1}]); "
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
                raise PlanError(f"{amp_source}: {amp} is not in (0, 1]; it is the share of each tile's memory "
                                "that convolutions and matmuls may use for temporary values")
            if stage.ipu in by_ipu and by_ipu[stage.ipu][0] != amp:
                other_amp, other = by_ipu[stage.ipu]
                raise PlanError(f"{amp_source}: {amp} differs from {other_amp} ({other}) for the same IPU "
                                f"{stage.ipu}; PopTorch sets available memory per IPU "
                                "(setAvailableMemoryProportion({'IPU<n>': p})), so stages sharing an IPU "
                                "must agree")
            by_ipu.setdefault(stage.ipu, (amp, amp_source))
        end = positions[i + 1] if i + 1 < len(pipeline) else len(names)
        stages.append(StagePlan(i, stage.start, stage.ipu, amp, stage.recompute, tuple(names[positions[i]:end])))
    # Stages sharing an IPU inherit each other's proportion (it is per IPU anyway).
    return tuple(dataclasses.replace(s, available_memory_proportion=by_ipu.get(s.ipu, (None,))[0]) for s in stages)


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
        # be checkpointed nor survive a detach (train/ipu_plan.py allows it only where neither happens; docs/ipu.md).
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


# ---------------------------------------------------------------------------------------------------- launches
def needs_own_launch(first: IpuPhasePlan, plan: IpuPhasePlan) -> bool:
    """True when ``plan`` cannot run in the poprun launch of ``first`` (other replicas or IPUs per replica)."""
    return (plan.replicas, plan.ipus_per_replica, plan.instances) != (first.replicas, first.ipus_per_replica,
                                                                      first.instances)


def launch_command(plan: IpuPhasePlan, config_path: Optional[str], separate: bool = False,
                   train_only: bool = False) -> str:
    """How to start the phase. Under poprun, replicas and IPUs per replica are fixed by the launch: a fine-tune
    phase with another geometry (``separate``) is started on its own from the training phase's checkpoint, and
    the training phase before it then runs without it (``train_only``)."""
    config = f" --config {config_path}" if config_path else ""
    if separate:
        target = f"python -m train.finetune --checkpoint <run>/checkpoints/train-final.pt{config}"
    else:
        target = f"python -m train{config}" + (" --set finetune.enabled=false" if train_only else "")
    if plan.instances == 1:
        return target
    return (f"poprun --num-instances {plan.instances} --num-replicas {plan.replicas} "
            f"--ipus-per-replica {plan.ipus_per_replica} {target}")


__all__ = ["Call", "IpuPhasePlan", "New", "PlanError", "StagePlan", "Symbol", "calls_to_json", "check_ipus_per_process",
           "constructor", "launch_command", "needs_own_launch", "resolve_collectives", "resolve_stages",
           "training_calls", "validation_calls"]
