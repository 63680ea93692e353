"""A strict stand-in for PopTorch 3.4, PopDist and Horovod, for tests on machines without the Poplar SDK.

It mirrors the documented API (``/work/shared/reference/poptorch-api.md``) closely enough to catch the mistakes
that would only show on an IPU machine:

- options are typed (``isinstance(value, type(default))``, so ``np.int64`` device iterations fail), unknown
  attributes raise ``AttributeError``, and frozen options raise ``AttributeError("Can't modify frozen Options")``;
  ``trainingModel``/``inferenceModel``/``DataLoader`` freeze the options they are given;
- ``BeginBlock`` refuses a module that already has a block; ``identity_loss`` asserts its reduction, and a
  training forward must return the loss it marked; ``inferenceModel`` needs gradient accumulation 1;
- compiling checks the pipeline rules: IPUs per replica a power of two (unless ``autoRoundNumIPUs``), training
  accumulation >= 2 x stages - 1, inference device iterations >= stages, a combined batch divisible by
  device iterations x replicas x accumulation; only one model can be attached to the IPUs at a time;
- ``poptorch.optim`` optimizers take their extras as keywords and check accumulator dtypes.

The executors run the wrapped model on the CPU: a training call splits the combined batch into
device iterations x replicas x accumulation micro-batches and, per device iteration, runs forward and backward
on each (the loss divided by replicas x accumulation, as ``ReductionType.Mean`` does) and one optimizer step;
outputs follow ``outputMode``. ``install(monkeypatch)`` puts fresh ``poptorch``, ``popdist`` and ``horovod``
modules into ``sys.modules``.
"""

from __future__ import annotations

import copy
import enum
import sys
import types
from typing import Any, Dict, List, Optional

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
        self.block_entries: List[Any] = []  # (user_id, ipu_id) as blocks start during a forward
        self.popdist: Dict[str, Any] = {"env": False, "instance": 0, "instances": 1, "total_replicas": 1,
                                        "ipus_per_replica": 1, "initialised": False}
        self.hvd: Dict[str, Any] = {"initialised": False, "broadcast_parameters": 0, "broadcasts": [],
                                    "allreduces": 0}
        self.dataloaders: List["DataLoader"] = []


STATE = State()


# ------------------------------------------------------------------------------------------------------ enums
class OutputMode(enum.IntEnum):
    All = 0
    Final = 1
    EveryN = 2
    Sum = 3
    Default = 4


class ReductionType(enum.IntEnum):
    Sum = 0
    Mean = 1
    NoReduction = 2


class MeanReductionStrategy(enum.IntEnum):
    Running = 0
    Post = 1
    PostAndLoss = 2


class DataLoaderMode(enum.IntEnum):
    Sync = 0
    Async = 1
    AsyncRebatched = 2


class SharingStrategy(enum.IntEnum):
    SharedMemory = 0
    FileSystem = 1
    Fork = 2
    ForkServer = 3


class ConnectionType(enum.IntEnum):
    Always = 0
    OnDemand = 1
    Never = 2


class SyncPattern(enum.IntEnum):
    Full = 0
    SinglePipeline = 1
    ReplicaAndLadder = 2


class CommGroupType(enum.IntEnum):
    All = 0
    Consecutive = 1
    Orthogonal = 2
    NoGrouping = 3


class AutoStage(enum.IntEnum):
    SameAsIpu = 0
    AutoIncrement = 1


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
        for key, value in kwargs.items():
            if key in self._values:
                self.set(**{key: value})
            else:
                self._values[key] = value

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
    def __init__(self) -> None:
        self._is_frozen = False
        self.options: Dict[str, Any] = {}
        self.options["instrumentWithHardwareCycleCounter"] = False

    def _freeze(self) -> None:
        self._is_frozen = True

    def set(self, key: str, value: Any) -> "_PopartOptions":
        if self._is_frozen:
            raise AttributeError("Can't modify frozen Options")
        assert isinstance(key, str)
        assert isinstance(value, (int, float, str, list, set, dict)), (
            f"_Popart.set({key!r}): PopART values are int, float, str, list/set of str or dict (enums as ints), "
            f"got {type(value).__name__}")
        if isinstance(value, enum.Enum):
            raise AssertionError(f"_Popart.set({key!r}): pass PopART enums as int, not {value!r}")
        self.options[key] = value  # replaces the whole value (dicts are not merged)
        return self

    def setEngineOptions(self, engine_options: Dict[str, str]) -> "_PopartOptions":
        return self.set("engineOptions", engine_options)

    def __deepcopy__(self, memo):
        new = _PopartOptions()
        new.options = copy.deepcopy(self.options, memo)
        return new


class _TrainingOptions(OptionsDict):
    def __init__(self, popart: _PopartOptions) -> None:
        super().__init__(gradient_accumulation=1, accumulation_and_replication_reduction_type=ReductionType.Mean,
                         meanAccumulationAndReplicationReductionStrategy=MeanReductionStrategy.Post)
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

    def setMeanAccumulationAndReplicationReductionStrategy(self, strategy: MeanReductionStrategy):
        assert isinstance(strategy, MeanReductionStrategy)
        self.set(meanAccumulationAndReplicationReductionStrategy=strategy)
        return self

    def setAutomaticLossScaling(self, enabled: bool) -> "_TrainingOptions":
        assert isinstance(enabled, bool)
        self._popart.set("automaticLossScalingSettings.enabled", enabled)
        return self

    def setConvolutionDithering(self, enabled: bool) -> "_TrainingOptions":
        self._popart.set("convolutionOptions", {"enableConvDithering": enabled})
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

    def enableFloatingPointExceptions(self, enabled: bool) -> "_PrecisionOptions":
        assert isinstance(enabled, bool)
        self._popart.set("enableFloatingPointChecks", enabled)
        return self

    def runningStatisticsAlwaysFloat(self, value: bool) -> "_PrecisionOptions":
        if not isinstance(value, bool):
            raise ValueError("runningStatisticsAlwaysFloat needs to be set to a bool")
        return self  # deprecated no-op in 3.x

    def halfFloatCasting(self, behaviour: Any) -> "_PrecisionOptions":
        return self  # deprecated no-op in 3.x


class TensorLocationSettings(OptionsDict):
    def useOnChipStorage(self, use: bool = True) -> "TensorLocationSettings":
        assert isinstance(use, bool)
        self.createOrSet(onChip=int(use))
        return self

    def useReplicatedTensorSharding(self, use: bool = True) -> "TensorLocationSettings":
        assert isinstance(use, bool)
        self.createOrSet(useReplicatedTensorSharding=int(use))
        return self

    def useIOTilesToLoad(self, use: bool = True) -> "TensorLocationSettings":
        assert isinstance(use, bool)
        self.createOrSet(useIOTilesToLoad=int(use))
        return self

    def useIOTilesToStore(self, use: bool = True) -> "TensorLocationSettings":
        assert isinstance(use, bool)
        self.createOrSet(useIOTilesToStore=int(use))
        return self

    def minElementsForOffChip(self, n: int) -> "TensorLocationSettings":
        assert isinstance(n, int)
        self.createOrSet(minElementsForOffChip=n)
        return self

    def minElementsForReplicatedTensorSharding(self, n: int) -> "TensorLocationSettings":
        assert isinstance(n, int)
        self.createOrSet(minElementsForReplicatedTensorSharding=n)
        return self


class _TensorLocationOptions(OptionsDict):
    def _location(self, key: str, location: TensorLocationSettings) -> "_TensorLocationOptions":
        assert isinstance(location, TensorLocationSettings)
        self.createOrSet(**{key: location.toDict()})
        return self

    def setActivationLocation(self, location):
        return self._location("location_activation", location)

    def setWeightLocation(self, location):
        return self._location("location_weight", location)

    def setOptimizerLocation(self, location):
        return self._location("location_optimizer", location)

    def setAccumulatorLocation(self, location):
        return self._location("location_accumulator", location)

    def numIOTiles(self, num_tiles: int):
        assert isinstance(num_tiles, int) and 32 <= num_tiles <= 192 and num_tiles % 2 == 0
        self.createOrSet(numIOTiles=num_tiles)
        return self


class _DistributedOptions(OptionsDict):
    def __init__(self) -> None:
        super().__init__(num_distributed_processes=1, distributed_process_id=0)

    def disable(self) -> "_DistributedOptions":
        self.set(num_distributed_processes=1, distributed_process_id=0)
        return self

    def configureProcessId(self, process_id: int, num_processes: int) -> "_DistributedOptions":
        self.set(distributed_process_id=process_id)
        self.set(num_distributed_processes=num_processes)
        return self

    @property
    def processId(self) -> int:
        return self._values["distributed_process_id"]

    @property
    def numProcesses(self) -> int:
        return self._values["num_distributed_processes"]


class _JitOptions(OptionsDict):
    def __init__(self) -> None:
        super().__init__(trace_model=False)

    def traceModel(self, trace_model: bool):
        if trace_model:
            raise ValueError("Tracing (Jit.traceModel(True)) was removed in PopTorch 3.x")
        return self


class Options(OptionsDict):
    def __init__(self) -> None:
        popart = _PopartOptions()
        super().__init__(device_iterations=1, replication_factor=1, input_group_size=1,
                         output_mode=int(OutputMode.Default), output_return_period=1,
                         connection_type=int(ConnectionType.Always), auto_round_num_ipus=False,
                         model_name="", log_dir=".", available_memory_proportion={}, ipu_version=2,
                         enable_stable_norm=False)
        for key, value in (("_popart", popart), ("_training", _TrainingOptions(popart)),
                           ("_precision", _PrecisionOptions(popart)), ("_tensor_locations", _TensorLocationOptions()),
                           ("_distributed", _DistributedOptions()), ("_jit", _JitOptions())):
            object.__setattr__(self, key, value)

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
    def Jit(self) -> _JitOptions:
        return self._jit

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

    def connectionType(self, connection_type: ConnectionType) -> "Options":
        assert isinstance(connection_type, ConnectionType)
        self.set(connection_type=int(connection_type))
        return self

    def useOfflineIpuTarget(self, ipu_version: int = 2) -> "Options":
        assert isinstance(ipu_version, int)
        self.connectionType(ConnectionType.Never)
        self.set(ipu_version=ipu_version)
        return self

    def enableSyntheticData(self, enabled: bool) -> "Options":
        self._check_frozen()
        self._popart.set("syntheticDataMode", 2 if enabled else 0)
        return self

    def modelName(self, name: str) -> "Options":
        self.set(model_name=name)
        return self

    def logDir(self, log_dir: str) -> "Options":
        self.set(log_dir=log_dir)
        return self

    def setAvailableMemoryProportion(self, available_memory_proportion: Dict[str, float]) -> "Options":
        assert isinstance(available_memory_proportion, dict)
        for key, value in available_memory_proportion.items():
            assert key.startswith("IPU"), f"Invalid IPU name {key!r}: keys must be IPU<n>"
            int(key[3:])
            assert isinstance(value, float), f"memory proportion of {key} must be a float"
        self.set(available_memory_proportion=dict(available_memory_proportion))
        return self

    def enableStableNorm(self, enabled: bool) -> "Options":
        assert isinstance(enabled, bool)
        self.set(enable_stable_norm=enabled)
        self._popart.set("enableStableNorm", enabled)
        return self

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
    if not isinstance(layer_to_call, torch.nn.Module):
        raise PoptorchError("the fake supports BeginBlock on modules only")
    if getattr(layer_to_call, "_fake_block", None) is not None:
        raise PoptorchError("module has already been assigned to a block")
    assert user_id is None or isinstance(user_id, str), "Block IDs are supposed to be strings"
    assert ipu_id is None or isinstance(ipu_id, int)
    object.__setattr__(layer_to_call, "_fake_block", (user_id, ipu_id))

    def enter(_module, _inputs):
        STATE.block_entries.append((user_id, ipu_id))

    layer_to_call.register_forward_pre_hook(enter)
    return layer_to_call


def removeBlocks(module: torch.nn.Module) -> None:
    for m in module.modules():
        if getattr(m, "_fake_block", None) is not None:
            object.__setattr__(m, "_fake_block", None)


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


def isRunningOnIpu() -> bool:
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
        self.weights_to_host = 0
        self.weights_to_device = 0
        self.compile_shapes: Optional[List[torch.Size]] = None
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

    # --- compile / attach
    def _stages(self) -> List[int]:
        ipus = []
        for m in self._user_model.modules():
            block = getattr(m, "_fake_block", None)
            if block is not None:
                ipus.append(block[1] if block[1] is not None else 0)
        return ipus or [0]

    def compile(self, *args) -> None:
        if self._compiled:
            return
        self._check_inputs(args)
        o = self._options
        ipus = self._stages()
        n_ipus = max(ipus) + 1
        stages = len(set(ipus))
        if n_ipus > 1 and not _is_power_of_two(n_ipus) and not o.auto_round_num_ipus:
            raise PoptorchError(f"The number of IPUs per replica ({n_ipus}) must be a power of two; set "
                                "autoRoundNumIPUs(True)")
        if self._training and stages > 1 and o.Training.gradient_accumulation < 2 * stages - 1:
            raise PoptorchError(f"poptorch.Options().Training.gradientAccumulation must be greater than or equal to "
                                f"the number of pipeline stages * 2 - 1 ({2 * stages - 1})")
        if not self._training and o.device_iterations < stages:
            raise PoptorchError(f"deviceIterations ({o.device_iterations}) must be >= the number of pipeline "
                                f"stages ({stages}) for inference")
        self.compile_shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
        self._compiled = True
        if o.connection_type != int(ConnectionType.Never):
            self._attach()

    def _attach(self) -> None:
        if STATE.attached is not None and STATE.attached is not self:
            raise PoptorchError("Failed to acquire IPUs: another model is attached (call detachFromDevice())")
        STATE.attached = self
        self._attached = True
        self.weights_to_device += 1

    def attachToDevice(self) -> None:
        if not self._compiled:
            raise PoptorchError("Model has not been compiled")
        if self._attached:
            raise PoptorchError("Device is already attached")
        self._attach()

    def detachFromDevice(self) -> None:
        if not self._attached:
            raise PoptorchError("Device is not attached")
        self.weights_to_host += 1
        self._attached = False
        if STATE.attached is self:
            STATE.attached = None

    def destroy(self) -> None:
        if self._attached:
            self.detachFromDevice()
        self._destroyed = True
        if self._training:
            object.__setattr__(self._user_model, "_fake_wrapped", False)

    # --- weights and optimizer
    def copyWeightsToHost(self) -> None:
        if not self._compiled:
            raise PoptorchError("Model has not been compiled")
        self.weights_to_host += 1

    def copyWeightsToHostIfNeeded(self) -> bool:
        if self._compiled and self._attached:
            self.weights_to_host += 1
            return True
        return False

    def copyWeightsToDevice(self) -> None:
        if not self._compiled:
            raise PoptorchError("Model has not been compiled")
        self.weights_to_device += 1

    def setOptimizer(self, optimizer) -> None:
        assert self._training
        self._optimizer = optimizer
        self.set_optimizer_calls += 1

    def load_state_dict(self, state_dict, strict: bool = True):
        out = self._user_model.load_state_dict(state_dict, strict)
        if self._attached:
            self.copyWeightsToDevice()
        return out

    def state_dict(self, *args, **kwargs):
        return self._user_model.state_dict(*args, **kwargs)

    # --- running
    def _check_inputs(self, args) -> None:
        o = self._options
        per_call = o.device_iterations * (o.replication_factor // o.input_group_size) * o.Training.gradient_accumulation
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
                    out = self._user_model(*micro)
                    loss = out[0] if isinstance(out, (tuple, list)) else out
                    if len(STATE.identity_loss_calls) == marked_before or id(loss) not in _MARKED:
                        raise PoptorchError("The training model must return the loss marked by "
                                            "poptorch.identity_loss as its first output")
                    mean = o.Training.accumulation_and_replication_reduction_type == ReductionType.Mean
                    (loss / replicas_ga if mean else loss).backward()
                    _MARKED.discard(id(loss))
                else:
                    with torch.no_grad():
                        out = self._user_model(*micro)
                outputs.append(tuple(t.detach() for t in out) if isinstance(out, (tuple, list)) else out.detach())
            if self._training:
                self._optimizer.step()
        return self._collect(outputs)

    def _collect(self, outputs: List[Any]) -> Any:
        mode = OutputMode(self._options.output_mode)
        if mode == OutputMode.Default:
            mode = OutputMode.Final if self._training else OutputMode.All
        single = not isinstance(outputs[0], tuple)
        rows = [(o,) if single else o for o in outputs]
        result = []
        for column in zip(*rows):
            column = list(column)
            if mode == OutputMode.All:
                result.append(torch.stack(column) if column[0].dim() == 0 else torch.cat(column))
            elif mode == OutputMode.Final:
                result.append(column[-1])
            elif mode == OutputMode.Sum:
                result.append(torch.stack(column).sum(0))
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
        options._freeze()
        self._options = options
        self._combined = (batch_size * options.device_iterations * (options.replication_factor //
                          options.input_group_size) * options.Training.gradient_accumulation)
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        if options.Distributed.numProcesses > 1 and auto_distributed_partitioning:
            assert not shuffle or options.exists("random_seed"), (
                "When using auto_distributed_partitioning you must set poptorch.Options.randomSeed()")
            per = len(dataset) // options.Distributed.numProcesses
            start = per * options.Distributed.processId
            dataset = torch.utils.data.Subset(dataset, range(start, start + per))
        if async_options is not None:
            assert "rebatched_size" not in async_options, "rebatched_size is not allowed in async_options"
        self._rebatch = mode == DataLoaderMode.AsyncRebatched
        worker_batch = self._combined
        if self._rebatch and rebatched_worker_size is not None:
            assert rebatched_worker_size <= self._combined, (
                f"The rebatched_worker_size ({rebatched_worker_size}) must be <= to the combined batch size "
                f"({self._combined})")
            worker_batch = rebatched_worker_size
        self._drop_last_combined = drop_last
        self._terminated = False
        super().__init__(dataset, batch_size=worker_batch, shuffle=bool(shuffle), num_workers=num_workers,
                         drop_last=drop_last and not self._rebatch, persistent_workers=persistent_workers,
                         **kwargs)
        STATE.dataloaders.append(self)

    @property
    def combinedBatchSize(self) -> int:
        return self._combined

    @property
    def options(self) -> Options:
        return self._options

    def terminate(self) -> None:
        self._terminated = True

    def __len__(self) -> int:
        return len(self.dataset) // self._combined

    def __iter__(self):
        if not self._rebatch:
            yield from super().__iter__()
            return
        pending: List[Any] = []
        count = 0
        for batch in super().__iter__():
            pending.append(batch)
            count += len(batch[0])
            while count >= self._combined:
                merged = [torch.cat(parts) for parts in zip(*pending)]
                yield [m[:self._combined] for m in merged]
                rest = [m[self._combined:] for m in merged]
                count -= self._combined
                pending = [rest] if count else []


# ------------------------------------------------------------------------------------------------- optimizers
_ACCUM = (torch.float32, torch.float16)


def _check_accum(kwargs: Dict[str, Any]) -> None:
    for key, value in kwargs.items():
        if key.endswith("accum_type") and value is not None:
            assert value in _ACCUM, f"{key} must be torch.float32 or torch.float16, got {value!r}"


class _PoptorchOptimizer:
    def _init_extras(self, loss_scaling, **extras) -> None:
        _check_accum(extras)
        self.loss_scaling = 1.0 if loss_scaling is None else float(loss_scaling)
        self.extras = extras
        self.host_state_is_dirty = False


class SGD(torch.optim.SGD, _PoptorchOptimizer):
    def __init__(self, params, lr, momentum=None, dampening=None, weight_decay=None, nesterov=None, *,
                 maximize=None, foreach=None, differentiable=None, loss_scaling=None, velocity_scaling=None,
                 use_combined_accum=None, accum_type=None, velocity_accum_type=None, max_grad_norm=None):
        super().__init__(params, lr=lr, momentum=momentum or 0.0, dampening=dampening or 0.0,
                         weight_decay=weight_decay or 0.0, nesterov=bool(nesterov))
        self._init_extras(loss_scaling, accum_type=accum_type, velocity_accum_type=velocity_accum_type,
                          use_combined_accum=use_combined_accum, velocity_scaling=velocity_scaling)


class RMSprop(torch.optim.RMSprop, _PoptorchOptimizer):
    def __init__(self, params, lr=None, alpha=None, eps=None, weight_decay=None, momentum=None, centered=None, *,
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
        # TensorFlow's variant: eps inside the square root, lr inside the momentum buffer (as train.optim's).
        from train.optim import RMSpropTF

        return RMSpropTF.step(self, closure)


class AdamW(torch.optim.AdamW, _PoptorchOptimizer):
    def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None, *, maximize=None,
                 foreach=None, capturable=None, differentiable=None, fused=None, loss_scaling=None,
                 bias_correction=None, accum_type=None, first_order_momentum_accum_type=None,
                 second_order_momentum_accum_type=None, max_grad_norm=None):
        if amsgrad:
            raise ValueError("amsgrad is not supported by poptorch.optim.AdamW")
        super().__init__(params, lr=1e-3 if lr is None else lr, betas=betas or (0.9, 0.999),
                         eps=1e-8 if eps is None else eps, weight_decay=1e-2 if weight_decay is None else weight_decay)
        self._init_extras(loss_scaling, accum_type=accum_type,
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

    def replicationFactor(self, replication_factor: int) -> "Options":
        raise AssertionError("the replication factor is set by poprun; do not call replicationFactor on "
                             "popdist.poptorch.Options")


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def build_modules() -> Dict[str, types.ModuleType]:
    optim = _module("poptorch.optim", SGD=SGD, RMSprop=RMSprop, AdamW=AdamW)
    poptorch = _module(
        "poptorch", Options=Options, TensorLocationSettings=TensorLocationSettings, OutputMode=OutputMode,
        ReductionType=ReductionType, MeanReductionStrategy=MeanReductionStrategy, DataLoaderMode=DataLoaderMode,
        SharingStrategy=SharingStrategy, ConnectionType=ConnectionType, SyncPattern=SyncPattern,
        CommGroupType=CommGroupType, AutoStage=AutoStage, BeginBlock=BeginBlock, removeBlocks=removeBlocks,
        recomputationCheckpoint=recomputationCheckpoint, identity_loss=identity_loss,
        isRunningOnIpu=isRunningOnIpu, trainingModel=trainingModel, inferenceModel=inferenceModel,
        DataLoader=DataLoader, PoplarExecutor=PoplarExecutor, optim=optim, STATE=STATE, __version__="3.4.0-fake")
    pd = STATE.popdist

    def init() -> None:
        pd["initialised"] = True

    popdist_poptorch = _module("popdist.poptorch", Options=PopdistOptions)
    popdist = _module(
        "popdist", isPopdistEnvSet=lambda: bool(pd["env"]), init=init,
        getInstanceIndex=lambda: pd["instance"], getNumInstances=lambda: pd["instances"],
        getNumTotalReplicas=lambda: pd["total_replicas"],
        getNumLocalReplicas=lambda: pd["total_replicas"] // pd["instances"],
        getNumIpusPerReplica=lambda: pd["ipus_per_replica"], getLocalInstanceIndex=lambda: pd["instance"],
        poptorch=popdist_poptorch)
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

    class _Op:
        pass

    Sum, Average = _Op(), _Op()

    def allreduce(tensor: torch.Tensor, op=Average, name: Optional[str] = None) -> torch.Tensor:
        # One process stands for every instance: all instances are taken to hold the same values.
        assert h["initialised"] and isinstance(tensor, torch.Tensor)
        h["allreduces"] += 1
        return tensor * pd["instances"] if op is Sum else tensor.clone()

    hvd_torch = _module("horovod.torch", init=hvd_init, rank=lambda: pd["instance"], size=lambda: pd["instances"],
                        local_rank=lambda: 0, broadcast_parameters=broadcast_parameters, broadcast=broadcast,
                        allreduce=allreduce, Sum=Sum, Average=Average)
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
