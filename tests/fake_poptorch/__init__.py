"""A strict stand-in for PopTorch 3.4 (with PopDist and Horovod), for tests on machines without the Poplar SDK.

It mirrors **PopTorch 3.4.0** (tag ``sdk/poptorch/3.4.0``, branch ``sdk-release-3.4``; torch 2.0.1) for exactly
what this project calls, and nothing else: a member the project does not use raises ``AttributeError``, an
argument it does not pass a ``PoptorchError`` that says the fake does not model it. Each rule
below names where PopTorch implements it, so a reader with the PopTorch sources can re-check it (paths are
relative to the PopTorch repository; where only a function is named, ``grep -rn "def NAME" python/`` finds it).

Options (``python/options.py`` and the ``python/_options_impl.py`` it imports)
  - ``OptionsDict.set``: known attributes only, values of the default's type (``np.int64`` is not an ``int``);
    ``trainingModel``/``inferenceModel``/``DataLoader`` freeze the Options they are given ("Can't modify frozen
    Options"); ``clone()`` is an unfrozen deep copy.
  - ``Options.__init__`` reads ``$POPTORCH_CACHE_DIR`` (``enableExecutableCaching``) and, through
    ``_DistributedOptions.setEnvVarNames("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")``, the MPI size and rank.
  - ``setAvailableMemoryProportion``: keys ``IPU<n>``, numbers (ints too).
  - ``_PopartOptions.set`` stores any key and value; they are checked when the model compiles, by the compiler's
    option registry (``popart_compiler/source/SessionOptions.cpp``): unknown keys, and values whose kind is not the
    key's, are refused. How a Python value reaches C++ is taken to follow its type, ``bool`` before ``int`` (the
    pybind layer, ``python/poptorch.cpp``): bool, unsigned int (``IntEnum`` members included; negative refused),
    double, string, container of strings (list, tuple, set) or string map. :data:`POPART_OPTIONS` holds only the
    keys this project sets, and the keys PopTorch's own setters write for it, with the kinds of their values.
    An enum key takes only its enum's values (:data:`POPART_ENUMS`, from PopART's ``sessionoptions.hpp``): a larger
    int is refused ("Value for ... out of range").
  - ``Options.toDict()`` (what the executor hands the compiler) asserts that an output mode was picked ("An output
    mode must be picked before serialisation"): ``Default`` is resolved by the executor first.
  - ``randomSeed``: the seed reaches the compiler as an unsigned 64-bit integer, so a negative one is refused
    (the fake refuses it at compile time).

Blocks and ops (the ``poptorch`` package, ``python/``)
  - ``BeginBlock`` modifies a module in place and refuses one that already has a block; a plain callable gets a
    wrapper. ``identity_loss`` takes ``"sum"``, ``"mean"`` or ``"none"``. The fake also requires the training
    forward to return the loss it marked (kept strict: not confirmed either way for 3.x).
  - ``recomputationCheckpoint`` returns its tensors (a single list or tuple comes back as the same container).

Compiling (``python/_poplar_executor.py``, ``popart_compiler/source/Compiler.cpp``, ``CompilerImpl.cpp``)
  - Pipeline stages are counted as changes of IPU between consecutive blocks (the fake takes the modules'
    registration order as execution order, true for ``nn.Sequential`` and this project's networks): training
    needs gradient accumulation >= 2 x stages - 1, inference device iterations >= stages, and an inference model
    gradient accumulation 1.
  - IPUs per process = (highest ``ipu_id`` + 1) x ``replicationFactor``: at most 64
    (``assertSingleInstanceMaxNumIPUs``; the fake applies it to offline targets too, which is not confirmed)
    and, when acquiring real IPUs, a power of two unless
    ``autoRoundNumIPUs(True)``; offline targets (``useOfflineIpuTarget``) skip the power-of-two rule.
  - The accumulate outer fragment schedule (PopART's default: Serial; PopTorch sets Scheduler itself, where none is
    set, when an optimizer clips gradients: ``Compiler.cpp``): PopART refuses Serial with
    ``replicatedCollectivesSettings.prepareScheduleForMergingCollectives``
    (``willow/src/transforms/contiguatecollectivesformerging.cpp`` in the PopART sources), and Serial with gradient
    clipping when pipelining, i.e. on more than one IPU (``willow/src/transforms/clipweightgradientsbynorm.cpp``).
  - The executable cache across processes (``python/_impl.py``, ``distributedCacheLock``): with more than one process
    and a cache folder, each compile appends one character to ``<md5 of repr(model)>.lock`` in the folder under an
    exclusive ``flock``; the first process compiles while holding it, and the process whose character makes the count
    equal to the number of processes deletes the file. So the file goes only once every process of the job has
    passed it in that folder.
  - Inputs: the batch dimension divisible by device iterations x replicas x accumulation
    (``PoplarExecutor._narrow_tensor``); a compiled model only takes the shapes it was compiled for. Only one
    model can hold the IPUs at a time; ``ConnectionType.Never`` models can only be compiled.

Optimizers (``python/optim.py``)
  - The constructors have torch 2.0.1's parameters, positional or keyword, then PopTorch's extras; accumulator
    dtypes must be ``torch.float32`` or ``torch.float16``. ``RMSprop(use_tf_variant=True)`` is TensorFlow's
    RMSProp (eps inside the square root, the learning rate inside the momentum buffer), implemented here on its
    own, with the mean square starting at 1 as TensorFlow's does, and as PopART does for the TF variant (its
    adaptive optimizer decomposition, ``willow/src/patterns/adaptivedecompose.cpp``, creates that accumulator
    filled with ones).
  - Optimizer state and PopART's ``disableOptimizerStateTensorStreams``: with the streams, ``state_dict()`` after
    compiling is the device's state, and a detach/attach copies it out and back. Without them the host copy is
    never updated from the device, and nothing can be uploaded: the fake's ``state_dict()`` then returns the
    host's copy as it was at compile time, and re-attaching a detached model restarts the device's state (a
    deduction: the state cannot survive the other executable that used the IPUs in between).

Exporting (``python/_poplar_executor.py``)
  - ``compileAndExport(filename, *args, export_model=True, **kwargs)`` is ``compile(*args)`` then
    ``save(filename, export_model)``; ``save`` needs a compiled model, creates the destination folder, and a folder
    as ``filename`` gets ``model.poptorch`` inside it. The fake writes a JSON description (inputs, options,
    whether the model was pickled in) where PopTorch writes the PopEF executable and its pickled metadata;
    keyword inputs are not modelled.

Data (``python/_dataloader.py``)
  - ``DataLoader``: combined batch = micro x device iterations x (replicas // input group) x accumulation;
    ``AsyncRebatched`` needs ``rebatched_worker_size`` <= the combined batch; an asynchronous loader cannot be
    iterated after ``terminate()``.

Enums (``python/enums.py``): ``OutputMode`` Final 0, EveryN 1, All 2, Sum 3, Default 4; ``ReductionType``,
``DataLoaderMode``, ``ConnectionType``.

PopDist and Horovod (not public sources; the shapes used by Graphcore's examples): ``popdist.poptorch.Options
(ipus_per_replica=...)`` is a ``poptorch.Options`` whose replication factor and process id come from poprun.

The executors run the wrapped model on the CPU: a training call splits the combined batch into device
iterations x replicas x accumulation micro-batches and, per device iteration, runs forward and backward on each
(the loss divided by replicas x accumulation, as ``ReductionType.Mean`` does) and one optimizer step; outputs
follow ``outputMode``. ``install(monkeypatch)`` puts fresh ``poptorch``, ``popdist`` and ``horovod`` modules into
``sys.modules``.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import fcntl
import hashlib
import json
import math
import os
import sys
import types
from typing import Any, DefaultDict, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader as TorchDataLoader


class PoptorchError(RuntimeError):
    pass


class State:
    """Per-install bookkeeping the tests can read."""

    def __init__(self) -> None:
        self.attached: Optional["PoplarExecutor"] = None
        self.executors: List["PoplarExecutor"] = []
        self.identity_loss_calls: List[str] = []
        self.checkpoints = 0
        self.running_on_ipu = False  # what poptorch.isRunningOnIpu() answers: True while a model runs "on the IPU"
        self.block_entries: List[Any] = []  # (user_id, ipu_id) as blocks start during a forward
        self.popdist: Dict[str, Any] = {"env": False, "instance": 0, "instances": 1, "total_replicas": 1,
                                        "ipus_per_replica": 1, "initialised": False}
        self.hvd: Dict[str, Any] = {"initialised": False, "broadcast_parameters": 0, "broadcasts": [],
                                    "allreduces": 0}
        self.dataloaders: List["DataLoader"] = []
        self.exports: List[str] = []  # files written by PoplarExecutor.save


STATE = State()
MAX_IPUS_PER_PROCESS = 64


# ------------------------------------------------------------------------------------------------------ enums
class OutputMode(enum.IntEnum):
    Final = 0
    EveryN = 1
    All = 2
    Sum = 3
    Default = 4


class ReductionType(enum.IntEnum):
    Sum = 0
    Mean = 1
    NoReduction = 2


class DataLoaderMode(enum.IntEnum):
    Sync = 0
    Async = 1
    AsyncRebatched = 2


class ConnectionType(enum.IntEnum):
    Always = 0
    OnDemand = 1
    Never = 2


# ------------------------------------------------------------------------------------------- PopART options
BOOL, UINT, DOUBLE, STRING, CONTAINER, MAP = "bool", "unsigned int", "double", "string", "container", "string map"

POPART_OPTIONS = {
    # Set by this project through _Popart.set (kinds as SessionOptions.cpp registers them).
    "convolutionOptions": MAP, "engineOptions": MAP, "groupNormStridedChannelGrouping": BOOL,
    "explicitRecomputation": BOOL, "autoRecomputation": UINT, "scheduleNonWeightUpdateGradientConsumersEarly": BOOL,
    "disableGradAccumulationTensorStreams": BOOL, "disableOptimizerStateTensorStreams": BOOL,
    "accumulateOuterFragmentSettings.schedule": UINT,
    "replicatedCollectivesSettings.prepareScheduleForMergingCollectives": BOOL,
    "replicatedCollectivesSettings.mergeAllReduceCollectives": BOOL,
    # Written by the PopTorch setters this project calls (the kinds of the values they pass).
    "partialsTypeMatMuls": STRING, "enableStochasticRounding": BOOL, "enableStableNorm": BOOL, "cachePath": STRING,
    "enableEngineCaching": BOOL, "syntheticDataMode": UINT, "automaticLossScalingSettings.enabled": BOOL,
}


#: PopART enum options among them: the enum and how many values it has (``sessionoptions.hpp`` of PopART 3.4);
#: the compiler refuses a larger int ("Value for ... out of range", ``SessionOptions.cpp``).
POPART_ENUMS = {
    # None, Standard, NormOnly, Pipeline, RecomputeAll
    "autoRecomputation": ("RecomputationType", 5),
    # Scheduler, Serial, OverlapCycleOptimized, OverlapMemoryOptimized
    "accumulateOuterFragmentSettings.schedule": ("AccumulateOuterFragmentSchedule", 4),
    # Off, Zeros, RandomNormal
    "syntheticDataMode": ("SyntheticDataMode", 3),
}
SCHEDULE_KEY = "accumulateOuterFragmentSettings.schedule"
SCHEDULER, SERIAL = 0, 1  # AccumulateOuterFragmentSchedule values; Serial is PopART's default
PREPARE_MERGING_KEY = "replicatedCollectivesSettings.prepareScheduleForMergingCollectives"


def _value_kind(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return UINT
    if isinstance(value, float):
        return DOUBLE
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple, set)):
        return CONTAINER
    if isinstance(value, dict):
        return MAP
    raise PoptorchError(f"Unknown value type {type(value).__name__} for option {key}")


def check_popart_options(options: Dict[str, Any]) -> None:
    """What the compiler does with ``_Popart`` options: every key registered, every value of the key's kind."""
    for key, value in options.items():
        kind = _value_kind(key, value)
        if key not in POPART_OPTIONS:
            raise PoptorchError(f"Unknown option {key!r}")
        if POPART_OPTIONS[key] != kind:
            raise PoptorchError(f"Unknown {kind} option {key!r} (it takes a {POPART_OPTIONS[key]})")
        if kind == UINT and value < 0:
            raise PoptorchError(f"Option {key!r}: {value} is not an unsigned integer")
        if key in POPART_ENUMS and value >= POPART_ENUMS[key][1]:
            raise PoptorchError(f"Value for {POPART_ENUMS[key][0]} out of range ({key}={value})")
        if kind == MAP and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise PoptorchError(f"Option {key!r} maps strings to strings, got {value!r}")


# ---------------------------------------------------------------------------------------------------- options
class OptionsDict:
    """Typed key/value store: ``set`` only known keys, with a value of the default's type, while unfrozen."""

    def __init__(self, **defaults: Any) -> None:
        object.__setattr__(self, "_values", dict(defaults))
        object.__setattr__(self, "_is_frozen", False)

    def _check_frozen(self) -> None:
        if self.__dict__.get("_is_frozen"):
            raise AttributeError("Can't modify frozen Options")

    def set(self, **kwargs: Any) -> None:
        self._check_frozen()
        for key, value in kwargs.items():
            assert key in self._values, f"Invalid option {key}, valid options are {sorted(self._values)}"
            default = self._values[key]
            assert isinstance(value, type(default)), (
                f"Unexpected type {type(value)} for option {key}. Expected {type(default)}")
            self._values[key] = value

    def createOrSet(self, **kwargs: Any) -> None:
        self._check_frozen()
        self._values.update(kwargs)

    def exists(self, key: str) -> bool:
        return key in self._values

    def toDict(self) -> Dict[str, Any]:
        return dict(self._values)

    def _freeze(self) -> None:
        object.__setattr__(self, "_is_frozen", True)
        for value in self.__dict__.values():
            if isinstance(value, (OptionsDict, _PopartOptions)):
                value._freeze()

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            self._check_frozen()
            object.__setattr__(self, name, value)
        else:
            self.set(**{name: value})

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            object.__setattr__(new, key, False if key == "_is_frozen" else copy.deepcopy(value, memo))
        return new


class _PopartOptions:
    """Stores anything; :func:`check_popart_options` runs when the model compiles."""

    def __init__(self) -> None:
        self._is_frozen = False
        self.options: Dict[str, Any] = {}

    def _freeze(self) -> None:
        self._is_frozen = True

    def set(self, key: str, value: Any) -> "_PopartOptions":
        if self._is_frozen:
            raise AttributeError("Can't modify frozen Options")
        self.options[key] = value  # replaces the whole value (dicts are not merged)
        return self

    def __deepcopy__(self, memo):
        new = _PopartOptions()
        new.options = copy.deepcopy(self.options, memo)
        return new


class _TrainingOptions(OptionsDict):
    def __init__(self, popart: _PopartOptions) -> None:
        super().__init__(gradient_accumulation=1, accumulation_and_replication_reduction_type=ReductionType.Mean)
        object.__setattr__(self, "_popart", popart)

    def gradientAccumulation(self, gradient_accumulation: int) -> "_TrainingOptions":
        self.set(gradient_accumulation=gradient_accumulation)
        return self

    def accumulationAndReplicationReductionType(self, reduction_type: ReductionType) -> "_TrainingOptions":
        if not isinstance(reduction_type, ReductionType) or reduction_type == ReductionType.NoReduction:
            raise ValueError("accumulationAndReplicationReductionType must be set to poptorch.ReductionType.Mean "
                             "or poptorch.ReductionType.Sum")
        self.set(accumulation_and_replication_reduction_type=reduction_type)
        return self

    def setAutomaticLossScaling(self, enabled: bool) -> "_TrainingOptions":
        assert isinstance(enabled, bool)
        self._popart.set("automaticLossScalingSettings.enabled", enabled)
        return self


class _PrecisionOptions(OptionsDict):
    def __init__(self, popart: _PopartOptions) -> None:
        super().__init__()
        object.__setattr__(self, "_popart", popart)

    def setPartialsType(self, dtype: torch.dtype) -> "_PrecisionOptions":
        if dtype in (torch.float, torch.float32):
            text = "float"
        elif dtype in (torch.half, torch.float16):
            text = "half"
        else:
            raise ValueError("parameter to setPartialsType should be either torch.float or torch.half")
        self._check_frozen()
        self._popart.set("partialsTypeMatMuls", text)
        self._popart.set("convolutionOptions", {"partialsType": text})
        return self

    def enableStochasticRounding(self, enabled: bool) -> "_PrecisionOptions":
        assert isinstance(enabled, bool)
        self._check_frozen()
        self._popart.set("enableStochasticRounding", enabled)
        return self


class TensorLocationSettings(OptionsDict):
    def useOnChipStorage(self, use: bool = True) -> "TensorLocationSettings":
        assert isinstance(use, bool)
        self.createOrSet(onChip=int(use))
        return self

    def useReplicatedTensorSharding(self, use: bool = True) -> "TensorLocationSettings":
        assert isinstance(use, bool)
        self.createOrSet(useReplicatedTensorSharding=int(use))
        return self


class _TensorLocationOptions(OptionsDict):
    def setOptimizerLocation(self, location: TensorLocationSettings) -> "_TensorLocationOptions":
        assert isinstance(location, TensorLocationSettings)
        self.createOrSet(location_optimizer=location.toDict())
        return self


class _DistributedOptions(OptionsDict):
    def __init__(self) -> None:
        super().__init__(num_distributed_processes=1, distributed_process_id=0)
        self.setEnvVarNames("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")

    def setEnvVarNames(self, var_num_processes: str, var_process_id: str) -> "_DistributedOptions":
        return self.configureProcessId(int(os.environ.get(var_process_id, "0")),
                                       int(os.environ.get(var_num_processes, "1")))

    def disable(self) -> "_DistributedOptions":
        return self.configureProcessId(0, 1)

    def configureProcessId(self, process_id: int, num_processes: int) -> "_DistributedOptions":
        self.set(distributed_process_id=process_id, num_distributed_processes=num_processes)
        return self

    @property
    def processId(self) -> int:
        return self._values["distributed_process_id"]

    @property
    def numProcesses(self) -> int:
        return self._values["num_distributed_processes"]


class Options(OptionsDict):
    def __init__(self) -> None:
        popart = _PopartOptions()
        super().__init__(device_iterations=1, replication_factor=1, input_group_size=1,
                         output_mode=int(OutputMode.Default), output_return_period=1,
                         connection_type=int(ConnectionType.Always), auto_round_num_ipus=False,
                         model_name="", available_memory_proportion={}, ipu_version=2, enable_stable_norm=False)
        for key, value in (("_popart", popart), ("_training", _TrainingOptions(popart)),
                           ("_precision", _PrecisionOptions(popart)), ("_tensor_locations", _TensorLocationOptions()),
                           ("_distributed", _DistributedOptions())):
            object.__setattr__(self, key, value)
        if "POPTORCH_CACHE_DIR" in os.environ:
            self.enableExecutableCaching(os.environ["POPTORCH_CACHE_DIR"])

    # sub-objects
    @property
    def Training(self) -> _TrainingOptions:
        return self._training

    @property
    def Precision(self) -> _PrecisionOptions:
        return self._precision

    @property
    def TensorLocations(self) -> _TensorLocationOptions:
        return self._tensor_locations

    @property
    def Distributed(self) -> _DistributedOptions:
        return self._distributed

    @property
    def _Popart(self) -> _PopartOptions:
        return self._popart

    # setters
    def deviceIterations(self, device_iterations: int) -> "Options":
        self.set(device_iterations=device_iterations)
        return self

    def replicationFactor(self, replication_factor: int) -> "Options":
        self.set(replication_factor=replication_factor)
        return self

    def randomSeed(self, random_seed: int) -> "Options":
        assert isinstance(random_seed, int)
        torch.manual_seed(random_seed)
        self.createOrSet(random_seed=random_seed)
        return self

    def enableExecutableCaching(self, path: Optional[str]) -> "Options":
        self._check_frozen()
        if path is None:
            self._popart.set("enableEngineCaching", False)
        else:
            assert isinstance(path, str)
            self._popart.set("cachePath", path)
            self._popart.set("enableEngineCaching", True)
        return self

    def outputMode(self, output_mode: OutputMode, output_return_period: Optional[int] = None) -> "Options":
        assert isinstance(output_mode, OutputMode), f"{output_mode!r} is not a poptorch.OutputMode"
        if output_mode == OutputMode.EveryN:
            assert output_return_period is not None and output_return_period > 0
        self.set(output_mode=int(output_mode))
        if output_return_period is not None:
            self.set(output_return_period=output_return_period)
        return self

    def autoRoundNumIPUs(self, auto_round_num_ipus: bool = True) -> "Options":
        assert isinstance(auto_round_num_ipus, bool)
        self.set(auto_round_num_ipus=auto_round_num_ipus)
        return self

    def useOfflineIpuTarget(self, ipu_version: int = 2) -> "Options":
        assert isinstance(ipu_version, int)
        self.set(connection_type=int(ConnectionType.Never), ipu_version=ipu_version)
        return self

    def enableSyntheticData(self, enabled: bool) -> "Options":
        self._check_frozen()
        self._popart.set("syntheticDataMode", 2 if enabled else 0)
        return self

    def modelName(self, name: str) -> "Options":
        self.set(model_name=name)
        return self

    def setAvailableMemoryProportion(self, available_memory_proportion: Dict[str, float]) -> "Options":
        assert isinstance(available_memory_proportion, dict)
        for key, value in available_memory_proportion.items():
            assert key.startswith("IPU"), f"Invalid IPU name {key!r}: keys must be IPU<n>"
            int(key[3:])
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (
                f"memory proportion of {key} must be a number")
        self.set(available_memory_proportion=dict(available_memory_proportion))
        return self

    def enableStableNorm(self, enabled: bool) -> "Options":
        assert isinstance(enabled, bool)
        self.set(enable_stable_norm=enabled)
        self._popart.set("enableStableNorm", enabled)
        return self

    def toDict(self) -> Dict[str, Any]:
        """Every option in one dict, as the compiler is given them; refused while the output mode is still
        ``Default`` (the executor resolves it to Final or All first)."""
        assert self.output_mode != int(OutputMode.Default), "An output mode must be picked before serialisation"
        out = dict(self._popart.options)
        for part in (self, self._training, self._distributed, self._tensor_locations):
            out.update(part._values)
        return out

    def clone(self) -> "Options":
        return copy.deepcopy(self)

    def __deepcopy__(self, memo):
        new = super().__deepcopy__(memo)
        # Sub-options share the one _Popart object, as in PopTorch.
        object.__setattr__(new._training, "_popart", new._popart)
        object.__setattr__(new._precision, "_popart", new._popart)
        return new


# ---------------------------------------------------------------------------------------------------- blocks
def BeginBlock(layer_to_call, user_id: Optional[str] = None, ipu_id: Optional[int] = None):
    assert user_id is None or isinstance(user_id, str), "Block IDs are supposed to be strings"
    assert ipu_id is None or isinstance(ipu_id, int)

    def enter(*_args) -> None:
        STATE.block_entries.append((user_id, ipu_id))

    if not isinstance(layer_to_call, torch.nn.Module):
        def legacy_block(*args, **kwargs):
            enter()
            return layer_to_call(*args, **kwargs)

        return legacy_block
    if getattr(layer_to_call, "_fake_block", None) is not None:
        raise PoptorchError("module has already been assigned to a block")
    object.__setattr__(layer_to_call, "_fake_block", (user_id, ipu_id))
    layer_to_call.register_forward_pre_hook(enter)
    return layer_to_call


def recomputationCheckpoint(*tensors):
    if len(tensors) == 1 and isinstance(tensors[0], (tuple, list)):
        return type(tensors[0])(recomputationCheckpoint(*tensors[0]))
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError("All inputs must be tensors")
        STATE.checkpoints += 1
        out.append(t)
    return out[0] if len(out) == 1 else tuple(out)


def identity_loss(x: torch.Tensor, reduction: str) -> torch.Tensor:
    assert reduction in ("sum", "mean", "none"), "reduction must be one of sum, mean, none"
    STATE.identity_loss_calls.append(reduction)
    out = x.sum() if reduction == "sum" else x.mean() if reduction == "mean" else x * 1
    _MARKED.add(id(out))
    return out


_MARKED: set = set()


def cpu_has_half_convolutions() -> bool:
    """Whether models with half convolutions can run here: the fake executes on the CPU, where torch 2.0.1 (the
    Poplar SDK 3.4 torch) has none."""
    try:
        torch.nn.Conv2d(2, 2, 1).half()(torch.zeros(1, 2, 2, 2, dtype=torch.half))
        return True
    except RuntimeError:
        return False


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# -------------------------------------------------------------------------------------------------- executor
class PoplarExecutor:
    def __init__(self, model: torch.nn.Module, options: Optional[Options], training: bool, optimizer=None):
        options = options if options is not None else Options()
        assert isinstance(options, Options)
        options._freeze()
        self._options = options.clone()
        self._training = training
        self._user_model = model
        self._compiled = False
        self._attached = False
        self._destroyed = False
        self.calls = 0
        self.set_optimizer_calls = 0
        self.compile_shapes: Optional[List[torch.Size]] = None
        self.compile_dtypes: List[torch.dtype] = []
        if training:
            if getattr(model, "_fake_wrapped", False):
                raise RuntimeError("Model has already been wrapped in 'poptorch.trainingModel'. Call "
                                   "model.destroy() on the model to unwrap before wrapping again.")
            self._optimizer = optimizer if optimizer is not None else SGD(model.parameters(), lr=0.01)
            wrapped = type(f"Poptorch{type(model).__name__}", (type(model),), {})
            model.__class__ = wrapped
            object.__setattr__(model, "_fake_wrapped", True)
        else:
            if self._options.Training.gradient_accumulation != 1:
                raise PoptorchError("You must set poptorch.Options().Training.gradientAccumulation to 1 or use the "
                                    "default when using an inference model")
            self._optimizer = None
        STATE.executors.append(self)

    # --- properties
    @property
    def model(self) -> torch.nn.Module:
        return self._user_model

    @property
    def options(self) -> Options:
        return self._options

    def isCompiled(self) -> bool:
        return self._compiled

    def isAttachedToDevice(self) -> bool:
        return self._attached

    def _optimizer_state_streams(self) -> bool:
        return not self._options._Popart.options.get("disableOptimizerStateTensorStreams", False)

    # --- compile / attach
    def _block_ipus(self) -> List[int]:
        ipus = []
        for m in self._user_model.modules():
            block = getattr(m, "_fake_block", None)
            if block is not None:
                ipus.append(block[1] if block[1] is not None else 0)
        return ipus or [0]

    def _check_outer_fragment_schedule(self, used_ipus: int) -> None:
        """PopART's two refusals of the Serial outer-fragment schedule (its default). PopTorch sets the Scheduler
        schedule itself, where none is set, when an optimizer clips gradients (``Compiler.cpp``)."""
        popart = self._options._Popart.options
        clipping = self._training and math.isfinite(getattr(self._optimizer, "max_grad_norm", math.inf))
        schedule = popart.get(SCHEDULE_KEY, SCHEDULER if clipping else SERIAL)
        if schedule != SERIAL:
            return
        if popart.get(PREPARE_MERGING_KEY, False):  # transforms/contiguatecollectivesformerging.cpp
            raise PoptorchError(f"Incompatible options: {PREPARE_MERGING_KEY} cannot be used with the Serial "
                                "accumulate outer fragment schedule")
        if clipping and used_ipus > 1:  # transforms/clipweightgradientsbynorm.cpp (pipelining: more than 1 IPU)
            raise PoptorchError("Incompatible accumulate outer fragment schedule with gradient clipping: a pipeline "
                                "cannot clip gradients under the Serial schedule")

    @contextlib.contextmanager
    def _cache_lock(self) -> Iterator[bool]:
        """PopTorch's compile lock for several processes sharing an executable cache (``python/_impl.py``,
        ``distributedCacheLock``): a file ``<md5 of repr(model)>.lock`` in the cache folder, to which each process
        appends one character under an exclusive lock; the first one compiles while holding it, and the process
        that brings the count to the number of processes deletes the file."""
        o = self._options
        cache = o._Popart.options.get("cachePath", "")
        if o.Distributed.numProcesses <= 1 or not cache:
            yield False
            return
        os.makedirs(cache, exist_ok=True)
        assert os.access(cache, os.W_OK), f"Cache folder {cache} is not writable"
        path = os.path.join(cache, hashlib.md5(repr(self._user_model).encode("utf-8")).hexdigest() + ".lock")
        last = False
        try:
            with open(path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    f.write("0")
                    f.flush()
                    last = f.tell() == o.Distributed.numProcesses
                    yield f.tell() == 1
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            if last:
                os.remove(path)

    def compile(self, *args) -> None:
        if self._compiled:
            return
        self._check_inputs(args)
        with self._cache_lock():
            pass  # every process passes the lock once per compile (the fake's compile is the checks below)
        o = self._options
        check_popart_options(o._Popart.options)
        seed = o.random_seed if o.exists("random_seed") else 0
        if not 0 <= seed < 2 ** 64:
            raise PoptorchError(f"randomSeed({seed}): the seed is an unsigned 64-bit integer")
        ipus = self._block_ipus()
        self._check_outer_fragment_schedule(len(set(ipus)))
        stages = 1 + sum(a != b for a, b in zip(ipus, ipus[1:], strict=False))
        per_process = (max(ipus) + 1) * o.replication_factor
        offline = o.connection_type == int(ConnectionType.Never)
        if per_process > MAX_IPUS_PER_PROCESS:
            raise PoptorchError(f"Too many IPUs requested ({per_process}). Experiments that need more than "
                                f"{MAX_IPUS_PER_PROCESS} IPUs require distributed execution.")
        if not offline and not _is_power_of_two(per_process) and not o.auto_round_num_ipus:
            raise PoptorchError(f"The model needs {per_process} IPUs per process: PopTorch must reserve a power of 2 "
                                f"or maximum of {MAX_IPUS_PER_PROCESS} IPUs per process; set autoRoundNumIPUs(True)")
        if self._training and stages > 1 and o.Training.gradient_accumulation < 2 * stages - 1:
            raise PoptorchError(f"poptorch.Options().Training.gradientAccumulation must be greater than or equal to "
                                f"the number of pipeline stages * 2 - 1 ({2 * stages - 1})")
        if not self._training and o.device_iterations < stages:
            raise PoptorchError(f"deviceIterations ({o.device_iterations}) must be >= the number of pipeline "
                                f"stages ({stages}) for inference")
        self.compile_shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
        self.compile_dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        self._compiled = True
        if self._training:
            self._optimizer._compiled_by(self)
        if not offline:
            self._attach()

    def _attach(self) -> None:
        if STATE.attached is not None and STATE.attached is not self:
            raise PoptorchError("Failed to acquire IPUs: another model is attached (call detachFromDevice())")
        STATE.attached = self
        self._attached = True

    def attachToDevice(self) -> None:
        if not self._compiled:
            raise PoptorchError("Model has not been compiled")
        if self._attached:
            raise PoptorchError("Device is already attached")
        self._attach()
        if self._training and not self._optimizer_state_streams():
            self._optimizer.state.clear()  # nothing can upload it: the device's state restarts

    def detachFromDevice(self) -> None:
        if not self._attached:
            raise PoptorchError("Device is not attached")
        self._attached = False
        if STATE.attached is self:
            STATE.attached = None

    def destroy(self) -> None:
        if self._attached:
            self.detachFromDevice()
        self._destroyed = True
        if self._training:
            object.__setattr__(self._user_model, "_fake_wrapped", False)

    # --- export
    def save(self, filename: str, export_model: bool = True, save_rng_state: bool = True) -> None:
        if not self._compiled:
            raise PoptorchError("Model has not been compiled or has been destroyed.")
        assert isinstance(export_model, bool) and isinstance(save_rng_state, bool)
        folder = os.path.dirname(filename)
        if folder:
            if os.path.exists(folder):
                assert os.path.isdir(folder), f"Destination folder {folder} is not a directory"
            else:
                os.makedirs(folder)
        if os.path.isdir(filename):
            filename = os.path.join(filename, "model.poptorch")
        o = self._options
        record = {"fake_popef": True, "training": self._training, "export_model": export_model,
                  "inputs": [[list(s), str(d)] for s, d in zip(self.compile_shapes or [], self.compile_dtypes,
                                                               strict=True)],
                  "options": {"device_iterations": o.device_iterations, "replication_factor": o.replication_factor,
                              "gradient_accumulation": o.Training.gradient_accumulation,
                              "output_mode": o.output_mode, "connection_type": o.connection_type,
                              "popart": {k: v for k, v in o._Popart.options.items()}}}
        with open(filename, "w") as f:
            json.dump(record, f)
        STATE.exports.append(filename)

    def compileAndExport(self, filename: str, *args, export_model: bool = True, **kwargs) -> None:
        if kwargs:
            raise PoptorchError("the fake does not model keyword inputs to compileAndExport")
        self.compile(*args)
        self.save(filename, export_model)

    # --- weights and optimizer
    def copyWeightsToHostIfNeeded(self) -> bool:
        return self._compiled and self._attached

    def copyWeightsToDevice(self) -> None:
        if not self._compiled:
            raise PoptorchError("Model has not been compiled")

    def setOptimizer(self, optimizer) -> None:
        assert self._training
        self._optimizer = optimizer
        self.set_optimizer_calls += 1

    # --- running
    def _batch_factor(self) -> int:
        o = self._options
        return o.device_iterations * (o.replication_factor // o.input_group_size) * o.Training.gradient_accumulation

    def _check_inputs(self, args) -> None:
        per_call = self._batch_factor()
        for a in args:
            if isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] % per_call):
                raise PoptorchError(f"Invalid batch dimension: {tuple(a.shape)} is not divisible by device "
                                    f"iterations x replicas x accumulation = {per_call}")
        if self.compile_shapes is not None:
            shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
            if shapes != self.compile_shapes:
                raise PoptorchError(f"The model was compiled for inputs {self.compile_shapes}, got {shapes}")

    def __call__(self, *args):
        if self._destroyed:
            raise PoptorchError("Model has been destroyed")
        if not self._compiled:
            if self._options.connection_type == int(ConnectionType.Never):
                raise AssertionError("Trying to run a model on an offline device (ConnectionType.Never): use "
                                     "model.compile(inputs) instead")
            self.compile(*args)
        if not self._attached:
            raise PoptorchError("Device is not attached: call attachToDevice()")
        self._check_inputs(args)
        self.calls += 1
        o = self._options
        replicas_ga = (o.replication_factor // o.input_group_size) * o.Training.gradient_accumulation
        n_micro = o.device_iterations * replicas_ga
        chunks = [a.chunk(n_micro) if isinstance(a, torch.Tensor) else [a] * n_micro for a in args]
        outputs = []
        for di in range(o.device_iterations):
            if self._training:
                self._optimizer.zero_grad(set_to_none=True)
            for j in range(replicas_ga):
                micro = [c[di * replicas_ga + j] for c in chunks]
                if self._training:
                    marked_before = len(STATE.identity_loss_calls)
                    out = self._run_on_ipu(*micro)
                    loss = out[0] if isinstance(out, (tuple, list)) else out
                    if len(STATE.identity_loss_calls) == marked_before or id(loss) not in _MARKED:
                        raise PoptorchError("The training model must return the loss marked by "
                                            "poptorch.identity_loss as its first output")
                    mean = o.Training.accumulation_and_replication_reduction_type == ReductionType.Mean
                    (loss / replicas_ga if mean else loss).backward()
                    _MARKED.discard(id(loss))
                else:
                    with torch.no_grad():
                        out = self._run_on_ipu(*micro)
                outputs.append(tuple(t.detach() for t in out) if isinstance(out, (tuple, list)) else out.detach())
            if self._training:
                self._optimizer._clip_gradients()
                self._optimizer.step()
        return self._collect(outputs)

    def _run_on_ipu(self, *micro):
        """The user's forward, as PopTorch traces and runs it: ``poptorch.isRunningOnIpu()`` is True inside."""
        STATE.running_on_ipu = True
        try:
            return self._user_model(*micro)
        finally:
            STATE.running_on_ipu = False

    def _collect(self, outputs: List[Any]) -> Any:
        mode = OutputMode(self._options.output_mode)
        if mode == OutputMode.Default:
            mode = OutputMode.Final if self._training else OutputMode.All
        single = not isinstance(outputs[0], tuple)
        rows = [(o,) if single else o for o in outputs]
        result = []
        for values in zip(*rows, strict=True):
            column = list(values)
            if mode == OutputMode.All:
                result.append(torch.stack(column) if column[0].dim() == 0 else torch.cat(column))
            elif mode == OutputMode.Final:
                result.append(column[-1])
            else:
                raise PoptorchError(f"the fake does not implement output mode {mode!r}")
        return result[0] if single else tuple(result)


def trainingModel(model: torch.nn.Module, options: Optional[Options] = None, optimizer=None) -> PoplarExecutor:
    return PoplarExecutor(model, options, training=True, optimizer=optimizer)


def inferenceModel(model: torch.nn.Module, options: Optional[Options] = None) -> PoplarExecutor:
    return PoplarExecutor(model, options, training=False)


# ------------------------------------------------------------------------------------------------ DataLoader
class DataLoader(TorchDataLoader):
    def __init__(self, options: Options, dataset, batch_size: int = 1, shuffle: Optional[bool] = None,
                 num_workers: int = 0, drop_last: bool = True, persistent_workers: Optional[bool] = None,
                 auto_distributed_partitioning: bool = True, mode: DataLoaderMode = DataLoaderMode.Sync,
                 async_options: Optional[Dict[str, Any]] = None, rebatched_worker_size: Optional[int] = None,
                 batch_sampler=None, **kwargs):
        assert isinstance(options, Options), "poptorch.DataLoader needs poptorch.Options as its first argument"
        assert isinstance(mode, DataLoaderMode), f"mode must be a poptorch.DataLoaderMode, got {mode!r}"
        assert isinstance(batch_size, int)
        if options.Distributed.numProcesses > 1 and auto_distributed_partitioning:
            raise PoptorchError("the fake does not model auto_distributed_partitioning")
        if async_options is not None or batch_sampler is not None:
            raise PoptorchError("the fake does not model async_options or batch_sampler")
        options._freeze()
        self._options = options
        self._combined = (batch_size * options.device_iterations * (options.replication_factor //
                          options.input_group_size) * options.Training.gradient_accumulation)
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        self._rebatch = mode == DataLoaderMode.AsyncRebatched
        self._asynchronous = mode != DataLoaderMode.Sync
        worker_batch = self._combined
        if self._rebatch and rebatched_worker_size is not None:
            assert rebatched_worker_size <= self._combined, (
                f"The rebatched_worker_size ({rebatched_worker_size}) must be <= to the combined batch size "
                f"({self._combined})")
            worker_batch = rebatched_worker_size
        self._terminated = False
        super().__init__(dataset, batch_size=worker_batch, shuffle=bool(shuffle), num_workers=num_workers,
                         drop_last=drop_last and not self._rebatch, persistent_workers=persistent_workers,
                         **kwargs)
        STATE.dataloaders.append(self)

    @property
    def combinedBatchSize(self) -> int:
        return self._combined

    def terminate(self) -> None:
        self._terminated = True

    def __len__(self) -> int:
        return len(self.dataset) // self._combined  # type: ignore[arg-type]

    def __iter__(self):
        if self._asynchronous and self._terminated:
            raise PoptorchError("The asynchronous data loader was terminated: create a new DataLoader")
        if not self._rebatch:
            yield from super().__iter__()
            return
        pending: List[Any] = []
        count = 0
        for batch in super().__iter__():
            pending.append(batch)
            count += len(batch[0])
            while count >= self._combined:
                merged = [torch.cat(parts) for parts in zip(*pending, strict=True)]
                yield [m[:self._combined] for m in merged]
                rest = [m[self._combined:] for m in merged]
                count -= self._combined
                pending = [rest] if count else []


# ------------------------------------------------------------------------------------------------- optimizers
_ACCUM = (torch.float32, torch.float16)


class _PoptorchOptimizer:
    """PopTorch's extras and the host/device split of the optimizer state (see the module docstring). Mixed in
    before a ``torch.optim.Optimizer``, whose ``state`` and ``state_dict`` it wraps."""

    state: DefaultDict[torch.Tensor, Any]

    def _init_extras(self, loss_scaling: Optional[float], max_grad_norm: Optional[float] = None,
                     **accum_types: Any) -> None:
        for key, value in accum_types.items():
            assert value is None or value in _ACCUM, f"{key} must be torch.float32 or torch.float16, got {value!r}"
        self.loss_scaling = 1.0 if loss_scaling is None else float(loss_scaling)
        # SGD/Adam/AdamW: the global gradient norm is clipped on the device before the update (default inf);
        # RMSprop and LAMB take no such argument (poptorch/optim.py of PopTorch 3.4).
        self.max_grad_norm = math.inf if max_grad_norm is None else float(max_grad_norm)
        self._executor: Optional[PoplarExecutor] = None
        self._host_copy: Optional[Dict[str, Any]] = None

    def _clip_gradients(self) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params and math.isfinite(self.max_grad_norm):
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def _compiled_by(self, executor: PoplarExecutor) -> None:
        self._executor = executor
        if not executor._optimizer_state_streams():
            self._host_copy = super().state_dict()  # type: ignore[misc]
            self.state.clear()  # nothing is uploaded: the device's state starts afresh

    def _device_unreachable(self) -> bool:
        return self._executor is not None and not self._executor._optimizer_state_streams()

    def state_dict(self) -> Dict[str, Any]:
        if self._device_unreachable():
            assert self._host_copy is not None
            return copy.deepcopy(self._host_copy)
        return super().state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self._device_unreachable():
            raise PoptorchError("the fake does not model loading optimizer state without optimizer-state streams")
        super().load_state_dict(state_dict)  # type: ignore[misc]


class SGD(_PoptorchOptimizer, torch.optim.SGD):
    def __init__(self, params, lr, momentum=None, dampening=None, weight_decay=None, nesterov=None, maximize=None,
                 foreach=None, differentiable=None, loss_scaling=None, velocity_scaling=None,
                 use_combined_accum=None, accum_type=None, velocity_accum_type=None, max_grad_norm=None):
        super().__init__(params, lr=lr, momentum=momentum or 0.0, dampening=dampening or 0.0,
                         weight_decay=weight_decay or 0.0, nesterov=bool(nesterov))
        self._init_extras(loss_scaling, max_grad_norm, accum_type=accum_type, velocity_accum_type=velocity_accum_type)


class RMSprop(_PoptorchOptimizer, torch.optim.RMSprop):
    def __init__(self, params, lr=None, alpha=None, eps=None, weight_decay=None, momentum=None, centered=None,
                 foreach=None, maximize=None, differentiable=None, loss_scaling=None, accum_type=None,
                 first_order_momentum_accum_type=None, second_order_momentum_accum_type=None, use_tf_variant=None):
        super().__init__(params, lr=0.01 if lr is None else lr, alpha=0.99 if alpha is None else alpha,
                         eps=1e-8 if eps is None else eps, weight_decay=weight_decay or 0.0,
                         momentum=momentum or 0.0, centered=bool(centered))
        self.use_tf_variant = bool(use_tf_variant)
        self._init_extras(loss_scaling, accum_type=accum_type,
                          first_order_momentum_accum_type=first_order_momentum_accum_type,
                          second_order_momentum_accum_type=second_order_momentum_accum_type)

    @torch.no_grad()
    def step(self, closure=None):
        if not self.use_tf_variant:
            return super().step(closure)
        for group in self.param_groups:
            lr, alpha, eps, mu, wd = (group[k] for k in ("lr", "alpha", "eps", "momentum", "weight_decay"))
            for p in (q for q in group["params"] if q.grad is not None):
                g = p.grad + wd * p
                slots = self.state[p]
                slots["step"] = slots.get("step", torch.tensor(0.0)) + 1  # (torch's RMSprop state has a step)
                mean_square = slots.setdefault("mean_square", torch.ones_like(p))
                velocity = slots.setdefault("velocity", torch.zeros_like(p))
                mean_square.copy_(alpha * mean_square + (1 - alpha) * g * g)
                velocity.copy_(mu * velocity + lr * g * torch.rsqrt(mean_square + eps))
                p -= velocity
        return None


class AdamW(_PoptorchOptimizer, torch.optim.AdamW):
    def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None, maximize=None,
                 foreach=None, capturable=None, differentiable=None, fused=None, loss_scaling=None,
                 bias_correction=None, accum_type=None, first_order_momentum_accum_type=None,
                 second_order_momentum_accum_type=None, max_grad_norm=None):
        if amsgrad:
            raise ValueError("amsgrad is not supported by poptorch.optim.AdamW")
        super().__init__(params, lr=1e-3 if lr is None else lr, betas=betas or (0.9, 0.999),
                         eps=1e-8 if eps is None else eps, weight_decay=1e-2 if weight_decay is None else weight_decay)
        self._init_extras(loss_scaling, max_grad_norm, accum_type=accum_type,
                          first_order_momentum_accum_type=first_order_momentum_accum_type,
                          second_order_momentum_accum_type=second_order_momentum_accum_type)


# ------------------------------------------------------------------------------------- popdist and horovod
class PopdistOptions(Options):
    """``popdist.poptorch.Options``: replication factor and process id come from poprun."""

    def __init__(self, ipus_per_replica: Optional[int] = None) -> None:
        super().__init__()
        pd = STATE.popdist
        assert pd["initialised"], "popdist.init() must be called before popdist.poptorch.Options"
        if ipus_per_replica is not None:
            assert ipus_per_replica == pd["ipus_per_replica"], (
                f"ipus_per_replica={ipus_per_replica} but poprun was given {pd['ipus_per_replica']}")
        self.set(replication_factor=pd["total_replicas"] // pd["instances"])
        self.Distributed.configureProcessId(pd["instance"], pd["instances"])


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def build_modules() -> Dict[str, types.ModuleType]:
    optim = _module("poptorch.optim", SGD=SGD, RMSprop=RMSprop, AdamW=AdamW)
    poptorch = _module(
        "poptorch", Options=Options, TensorLocationSettings=TensorLocationSettings, OutputMode=OutputMode,
        ReductionType=ReductionType, DataLoaderMode=DataLoaderMode, ConnectionType=ConnectionType,
        BeginBlock=BeginBlock, recomputationCheckpoint=recomputationCheckpoint, identity_loss=identity_loss,
        trainingModel=trainingModel, inferenceModel=inferenceModel, DataLoader=DataLoader, optim=optim,
        isRunningOnIpu=lambda: STATE.running_on_ipu, STATE=STATE, __version__="3.4.0-fake")
    pd = STATE.popdist

    def init() -> None:
        pd["initialised"] = True

    popdist_poptorch = _module("popdist.poptorch", Options=PopdistOptions)
    popdist = _module(
        "popdist", isPopdistEnvSet=lambda: bool(pd["env"]), init=init,
        getInstanceIndex=lambda: pd["instance"], getNumInstances=lambda: pd["instances"],
        getNumTotalReplicas=lambda: pd["total_replicas"],
        getNumLocalReplicas=lambda: pd["total_replicas"] // pd["instances"],
        getNumIpusPerReplica=lambda: pd["ipus_per_replica"], poptorch=popdist_poptorch)
    h = STATE.hvd

    def hvd_init() -> None:
        h["initialised"] = True

    def broadcast_parameters(params, root_rank: int) -> None:
        assert h["initialised"] and root_rank == 0
        h["broadcast_parameters"] += 1

    def broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None) -> torch.Tensor:
        assert h["initialised"] and root_rank == 0 and isinstance(tensor, torch.Tensor)
        h["broadcasts"].append(tensor.clone())
        return tensor.clone()

    Sum = object()

    def allreduce(tensor: torch.Tensor, op=None, name: Optional[str] = None) -> torch.Tensor:
        # One process stands for every instance: all instances are taken to hold the same values.
        assert h["initialised"] and isinstance(tensor, torch.Tensor) and op is Sum
        h["allreduces"] += 1
        return tensor * pd["instances"]

    hvd_torch = _module("horovod.torch", init=hvd_init, broadcast_parameters=broadcast_parameters,
                        broadcast=broadcast, allreduce=allreduce, Sum=Sum)
    horovod = _module("horovod", torch=hvd_torch)
    return {"poptorch": poptorch, "poptorch.optim": optim, "popdist": popdist, "popdist.poptorch": popdist_poptorch,
            "horovod": horovod, "horovod.torch": hvd_torch}


def install(monkeypatch, *, popdist: Optional[Dict[str, Any]] = None) -> types.ModuleType:
    """Fresh fake modules in ``sys.modules`` (undone by ``monkeypatch``); returns the fake ``poptorch``.

    ``popdist={"instance": 1, "instances": 2, "total_replicas": 4, "ipus_per_replica": 2}`` simulates running
    under poprun as that instance.
    """
    global STATE
    STATE = State()
    _MARKED.clear()
    if popdist is not None:
        STATE.popdist.update(popdist, env=True)
    for name, module in build_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    from ipu_options import distributed

    distributed.reset()
    monkeypatch.setattr(distributed, "_STATE", {})
    return sys.modules["poptorch"]
