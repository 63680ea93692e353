"""The PopTorch contract: what PopTorch 3.4 accepts and refuses, for everything this project calls.

Every test takes ``impl``, parametrised by implementation: ``fake`` (tests/fake_poptorch, everywhere) and ``real``
(the Poplar SDK's ``poptorch``, wherever it imports; skipped elsewhere). The same assertions run on both, so the
fake cannot drift from PopTorch without a test failing on an SDK machine. Tests that need IPUs (device rules,
training steps) run for ``real`` only where IPUs are found or ``POPTORCH_IPU_MODEL=1`` is set, and assume as many
IPUs as they ask for (up to 8); offline compiles need no IPU. The fake's errors are checked by type and message;
PopTorch's types and wording are its own, so for ``real`` any exception counts as a refusal.
"""

import enum
import json
import os
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_MODEL
from fake_poptorch import PoptorchError, cpu_has_half_convolutions, install
from ipu_options import distributed
from ipu_options.__main__ import main as ipu_main
from ipu_options.plan import OUTER_FRAGMENT_SCHEDULE, RECOMPUTATION_TYPE
from train.checkpoint import load_checkpoint
from train.cli import main as train_main
from train.optim import RMSpropTF


def _has_ipus() -> bool:
    return bool(os.environ.get("POPTORCH_IPU_MODEL")) or os.path.exists("/dev/ipu0") or \
        bool(os.environ.get("IPUOF_CONFIG_PATH")) or bool(os.environ.get("IPUOF_VIPU_API_HOST"))


@dataclass
class Impl:
    name: str
    poptorch: ModuleType

    @property
    def fake(self) -> bool:
        return self.name == "fake"

    @property
    def precision(self) -> str:
        """The fake runs on the CPU, where torch 2.0.1 has no half convolutions."""
        return "'16.16'" if not self.fake else "'16.32'" if cpu_has_half_convolutions() else "fp32"

    def rejects(self, error: type, match: str) -> AbstractContextManager:
        return pytest.raises(error, match=match) if self.fake else pytest.raises(Exception)

    def needs_ipus(self) -> None:
        if not self.fake and not _has_ipus():
            pytest.skip("no IPU found (set POPTORCH_IPU_MODEL=1 to use the IPU Model)")


@pytest.fixture(params=["fake", "real"])
def impl(request, monkeypatch):
    monkeypatch.delenv("POPTORCH_CACHE_DIR", raising=False)
    for var in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    if request.param == "fake":
        return Impl("fake", install(monkeypatch))
    real = pytest.importorskip("poptorch", reason="PopTorch ships only with the Poplar SDK; these tests run there")
    distributed.reset()
    monkeypatch.setattr(distributed, "_STATE", {})
    return Impl("real", real)


# --------------------------------------------------------------------------------------------------- helpers
class Pipelined(nn.Module):
    """Linear layers placed on ``ipus`` in order; the training forward returns the marked loss first."""

    def __init__(self, poptorch, ipus, training: bool = False):
        super().__init__()
        self.layers = nn.Sequential(*[poptorch.BeginBlock(nn.Linear(4, 4), f"b{i}", ipu_id=ipu)
                                      for i, ipu in enumerate(ipus)])
        self.poptorch, self.is_training = poptorch, training

    def forward(self, x):
        out = self.layers(x)
        if not self.is_training:
            return out
        return self.poptorch.identity_loss((out ** 2).mean(), reduction="mean"), out


def compile_model(impl, opts, ipus=(0,), training=False, offline=True, samples=None, max_grad_norm=None):
    """Wrap a small pipelined model with ``opts`` and compile it (on an offline target unless ``offline`` is
    False, where real PopTorch then needs IPUs); a training model clips its gradients at ``max_grad_norm``."""
    pt = impl.poptorch
    if offline:
        opts.useOfflineIpuTarget()
    model = Pipelined(pt, ipus, training)
    if samples is None:
        samples = opts.device_iterations * opts.replication_factor * opts.Training.gradient_accumulation
    optimizer = None if max_grad_norm is None else pt.optim.SGD(model.parameters(), lr=0.01,
                                                                max_grad_norm=max_grad_norm)
    executor = (pt.trainingModel(model.train(), options=opts, optimizer=optimizer) if training
                else pt.inferenceModel(model.eval(), options=opts))
    try:
        executor.compile(torch.zeros(samples, 4))
    finally:
        if executor.isCompiled():
            executor.destroy()


# ------------------------------------------------------------------------------------------------ options
def test_options_are_typed_frozen_and_closed(impl):
    pt = impl.poptorch
    opts = pt.Options()
    with impl.rejects(AssertionError, "Unexpected type"):
        opts.deviceIterations(np.int64(4))
    with pytest.raises(AttributeError):
        opts.deviceIteration(4)  # misspelt setter
    with pytest.raises(AttributeError):
        opts.Training.gradientAccumulations(2)
    with pytest.raises(AttributeError):
        _ = opts.not_an_option
    opts.Training.gradientAccumulation(2)
    pt.trainingModel(Pipelined(pt, [0], training=True), options=opts)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        opts.deviceIterations(2)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        opts._Popart.set("enableStableNorm", True)
    clone = opts.clone()
    clone.deviceIterations(2)  # a clone is unfrozen
    with pytest.raises(ValueError):
        clone.Training.accumulationAndReplicationReductionType(pt.ReductionType.NoReduction)


def test_output_mode_values(impl):
    modes = impl.poptorch.OutputMode
    assert {m: int(getattr(modes, m)) for m in ("Final", "EveryN", "All", "Sum", "Default")} == \
        {"Final": 0, "EveryN": 1, "All": 2, "Sum": 3, "Default": 4}


def test_options_read_the_cache_folder_from_the_environment(impl, monkeypatch):
    monkeypatch.setenv("POPTORCH_CACHE_DIR", "/localdata/exe-cache")
    popart = impl.poptorch.Options()._Popart.options
    assert popart["cachePath"] == "/localdata/exe-cache" and popart["enableEngineCaching"] is True


def test_options_read_the_mpi_process_count_and_index(impl, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    distributed_options = impl.poptorch.Options().Distributed
    assert (distributed_options.numProcesses, distributed_options.processId) == (4, 2)
    distributed_options.disable()
    assert (distributed_options.numProcesses, distributed_options.processId) == (1, 0)


def test_options_are_serialised_only_with_an_output_mode(impl):
    """``toDict`` (what the executor hands the compiler) refuses the unresolved ``Default`` output mode."""
    pt = impl.poptorch
    with pytest.raises(AssertionError, match="output mode must be picked"):
        pt.Options().toDict()
    opts = pt.Options().deviceIterations(3).outputMode(pt.OutputMode.All)
    opts.Training.gradientAccumulation(2)
    opts._Popart.set("enableStableNorm", True)
    merged = opts.toDict()
    assert (merged["output_mode"], merged["device_iterations"], merged["gradient_accumulation"]) == (2, 3, 2)
    assert merged["enableStableNorm"] is True


def test_memory_proportions_may_be_ints(impl):
    opts = impl.poptorch.Options().deviceIterations(2).setAvailableMemoryProportion({"IPU0": 1, "IPU1": 0.2})
    compile_model(impl, opts, ipus=(0, 1))


def test_negative_seeds_are_refused(impl):
    opts = impl.poptorch.Options().randomSeed(7)
    compile_model(impl, opts)
    with impl.rejects(PoptorchError, "unsigned 64-bit"):
        compile_model(impl, impl.poptorch.Options().randomSeed(-1))


# ------------------------------------------------------------------------------------------ PopART options
class _Schedule(enum.IntEnum):  # what popart.AccumulateOuterFragmentSchedule would hand over
    OverlapMemoryOptimized = 3


PROJECT_KEYS = [
    ("convolutionOptions", {"partialsType": "half", "enableConvDithering": "true"}),
    ("engineOptions", {"opt.internalExchangeOptimisationTarget": "balanced",
                       "target.deterministicWorkers": "portable"}),
    ("groupNormStridedChannelGrouping", True), ("explicitRecomputation", True),
    ("scheduleNonWeightUpdateGradientConsumersEarly", True), ("disableGradAccumulationTensorStreams", True),
    ("disableOptimizerStateTensorStreams", True),
    ("accumulateOuterFragmentSettings.schedule", _Schedule.OverlapMemoryOptimized),  # int enums are ints
    ("replicatedCollectivesSettings.mergeAllReduceCollectives", True),
    # every value of the project's enum maps (ipu_options/plan.py) is in its PopART enum's range
    *[("autoRecomputation", v) for v in RECOMPUTATION_TYPE.values()],
    *[("accumulateOuterFragmentSettings.schedule", v) for v in OUTER_FRAGMENT_SCHEDULE.values()],
]


@pytest.mark.parametrize("key,value", PROJECT_KEYS, ids=[f"{k}={v!r}" for k, v in PROJECT_KEYS])
def test_popart_takes_the_project_keys_with_their_types(impl, key, value):
    opts = impl.poptorch.Options()
    opts.Training.gradientAccumulation(2)
    opts._Popart.set(key, value)
    compile_model(impl, opts, training=True)


WRONG = [
    ("noSuchOption", True, "Unknown option"),
    ("disableOptimizerStateTensorStreams", "true", "Unknown string option"),
    ("accumulateOuterFragmentSettings.schedule", 3.0, "Unknown double option"),
    ("accumulateOuterFragmentSettings.schedule", -1, "not an unsigned integer"),
    # PopART 3.4's enums (sessionoptions.hpp): 4 schedules, 5 recomputation types, 3 synthetic data modes
    ("accumulateOuterFragmentSettings.schedule", 4, "AccumulateOuterFragmentSchedule out of range"),
    ("autoRecomputation", 5, "RecomputationType out of range"),
    ("syntheticDataMode", 3, "SyntheticDataMode out of range"),
    ("engineOptions", "target.deterministicWorkers=portable", "Unknown string option"),
    ("engineOptions", ("target.deterministicWorkers", "portable"), "Unknown container option"),
]


@pytest.mark.parametrize("key,value,message", WRONG, ids=[f"{k}={v!r}" for k, v, _ in WRONG])
def test_popart_refuses_unknown_keys_and_values_of_another_kind(impl, key, value, message):
    opts = impl.poptorch.Options()
    opts._Popart.set(key, value)  # stored as given (tuples and int enums too): the compiler checks it
    assert opts._Popart.options[key] == value
    with impl.rejects(PoptorchError, message):
        compile_model(impl, opts)


def test_popart_refuses_the_serial_schedule_when_preparing_merged_collectives(impl):
    """PopART's transform that lines up collectives for merging refuses the Serial outer-fragment schedule, which is
    also PopART's default (transforms/contiguatecollectivesformerging.cpp); the other schedules take it."""
    pt = impl.poptorch
    for schedule in (0, 2, 3):
        opts = pt.Options()
        opts._Popart.set("replicatedCollectivesSettings.prepareScheduleForMergingCollectives", True)
        opts._Popart.set("accumulateOuterFragmentSettings.schedule", schedule)
        compile_model(impl, opts)
    for schedule in (1, None):  # explicit, or PopART's default
        opts = pt.Options()
        opts._Popart.set("replicatedCollectivesSettings.prepareScheduleForMergingCollectives", True)
        if schedule is not None:
            opts._Popart.set("accumulateOuterFragmentSettings.schedule", schedule)
        with impl.rejects(PoptorchError, "prepareScheduleForMergingCollectives cannot be used with the Serial"):
            compile_model(impl, opts)


def test_popart_refuses_clipping_a_pipeline_under_the_serial_schedule(impl):
    """transforms/clipweightgradientsbynorm.cpp: gradient clipping on a pipeline (more than one IPU) refuses the
    Serial schedule; PopTorch picks Scheduler itself when none is set (Compiler.cpp), and one IPU takes Serial."""
    pt = impl.poptorch

    def training(schedule, ipus=(0, 1)):
        opts = pt.Options()
        opts.Training.gradientAccumulation(3)
        if schedule is not None:
            opts._Popart.set("accumulateOuterFragmentSettings.schedule", schedule)
        compile_model(impl, opts, ipus=ipus, training=True, max_grad_norm=1.0)

    training(None)
    training(3)
    training(1, ipus=(0,))
    with impl.rejects(PoptorchError, "cannot clip gradients under the Serial schedule"):
        training(1)


# ------------------------------------------------------------------------------------ executable cache lock
def _compile_as_instance(impl, cache, instance, instances):
    """One process of an ``instances``-process job (``configureProcessId``) compiling the same model into
    ``cache``."""
    opts = impl.poptorch.Options()
    opts.Distributed.configureProcessId(instance, instances)
    opts.enableExecutableCaching(str(cache))
    compile_model(impl, opts)


def _lock_counts(folder):
    """Each lock file's count: how many processes have passed it (one character each)."""
    return sorted(path.stat().st_size for path in folder.glob("*.lock"))


def test_the_compile_lock_goes_once_every_instance_has_passed_one_shared_folder(impl, tmp_path):
    """PopTorch's lock in the executable cache (python/_impl.py, distributedCacheLock) counts the processes that
    compiled a model; the one that completes the job's count deletes it, so a shared folder is left clean."""
    cache = tmp_path / "exe-cache"
    for instance in range(4):
        _compile_as_instance(impl, cache, instance, 4)
        assert _lock_counts(cache) == ([instance + 1] if instance < 3 else [])
    for instance in range(4):  # a later compile of the same model starts a fresh count, and ends clean again
        _compile_as_instance(impl, cache, instance, 4)
    assert _lock_counts(cache) == []


def test_the_compile_lock_stays_in_per_host_cache_folders(impl, tmp_path):
    """Why docs/ipu.md asks for one folder per job: 4 instances on 2 hosts with a folder each never complete the
    count of 4 in either folder, so both locks stay (and a later compile never finds itself first)."""
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    for instance in range(4):
        _compile_as_instance(impl, hosts[instance // 2], instance, 4)
    assert [_lock_counts(host) for host in hosts] == [[2], [2]]


# --------------------------------------------------------------------------------------------- pipelining
def test_pipeline_stages_count_changes_of_ipu(impl):
    """0 -> 1 -> 0 is three stages (two IPUs): training needs accumulation >= 5, inference 3 iterations."""
    pt = impl.poptorch
    opts = pt.Options()
    opts.Training.gradientAccumulation(3)
    compile_model(impl, opts, ipus=(0, 0, 1), training=True)
    opts = pt.Options()
    opts.Training.gradientAccumulation(3)
    with impl.rejects(PoptorchError, r"stages \* 2 - 1 \(5\)"):
        compile_model(impl, opts, ipus=(0, 1, 0), training=True)
    with impl.rejects(PoptorchError, r"number of pipeline stages \(3\)"):
        compile_model(impl, pt.Options().deviceIterations(2), ipus=(0, 1, 0))


def test_ipus_per_process_must_be_a_power_of_two_on_hardware(impl):
    impl.needs_ipus()
    pt = impl.poptorch
    with impl.rejects(PoptorchError, "power of 2 or maximum of 64 IPUs per process"):
        compile_model(impl, pt.Options().replicationFactor(3).deviceIterations(2), ipus=(0, 1), offline=False)


def test_auto_round_and_offline_targets_allow_other_ipu_counts(impl):
    pt = impl.poptorch
    compile_model(impl, pt.Options().deviceIterations(3), ipus=(0, 1, 2))  # offline: 3 IPUs
    compile_model(impl, pt.Options().replicationFactor(3).deviceIterations(2), ipus=(0, 1))  # offline: 6 IPUs
    if impl.fake or _has_ipus():  # (real: needs 8 IPUs)
        opts = pt.Options().replicationFactor(3).deviceIterations(2).autoRoundNumIPUs(True)
        compile_model(impl, opts, ipus=(0, 1), offline=False)


def test_at_most_64_ipus_per_process(impl):
    impl.needs_ipus()
    with impl.rejects(PoptorchError, r"Too many IPUs requested \(66\)"):
        compile_model(impl, impl.poptorch.Options().replicationFactor(33).deviceIterations(2), ipus=(0, 1),
                      offline=False)


# ------------------------------------------------------------------------------------- blocks, losses, models
def test_blocks_losses_and_model_rules(impl):
    pt = impl.poptorch
    layer = nn.Linear(2, 2)
    assert pt.BeginBlock(layer, "a", ipu_id=0) is layer
    with pytest.raises(Exception):  # noqa: B017 -- PopTorch's own type; any refusal counts (module docstring)
        pt.BeginBlock(layer, "b", ipu_id=1)  # a module gets one block
    block = pt.BeginBlock(torch.relu, "c", ipu_id=0)  # a plain callable is wrapped
    assert torch.equal(block(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
    with pytest.raises(AssertionError):
        pt.identity_loss(torch.ones(()), reduction="average")
    opts = pt.Options()
    opts.Training.gradientAccumulation(2)
    with impl.rejects(PoptorchError, "gradientAccumulation to 1"):
        pt.inferenceModel(nn.Linear(2, 2), options=opts)
    model = nn.Linear(2, 2)
    pt.trainingModel(model)
    with pytest.raises(RuntimeError, match="already been wrapped"):
        pt.trainingModel(model)


def test_optimizers_take_every_argument_positionally_and_check_accumulators(impl):
    """torch 2.0.1's parameters in order, then PopTorch's extras (the project passes extras by keyword)."""
    optim = impl.poptorch.optim
    params = list(nn.Linear(2, 2).parameters())
    sgd = optim.SGD(params, 0.1, 0.9, None, None, None, None, None, None, 64.0)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.loss_scaling == 64.0
    rmsprop = optim.RMSprop(params, 0.01, 0.95, 1e-3, None, 0.9, None, None, None, None, 128.0)
    assert rmsprop.param_groups[0]["alpha"] == 0.95 and rmsprop.loss_scaling == 128.0
    adamw = optim.AdamW(params, 1e-3, (0.8, 0.9), None, None, None, None, None, None, None, None, 32.0)
    assert tuple(adamw.param_groups[0]["betas"]) == (0.8, 0.9) and adamw.loss_scaling == 32.0
    optim.RMSprop(params, lr=0.01, use_tf_variant=True, accum_type=torch.float16, loss_scaling=128.0)
    with pytest.raises(AssertionError):
        optim.SGD(params, lr=0.1, accum_type=torch.bfloat16)


def test_tf_rmsprop_steps_as_tensorflow_computes_them(impl):
    """Two steps of ``poptorch.optim.RMSprop(use_tf_variant=True)`` equal the CPU/GPU backend's RMSpropTF with
    the same hyperparameters (the mean square starting at 1, as PopART's TF variant initialises it: docs/ipu.md)."""
    impl.needs_ipus()
    pt = impl.poptorch
    torch.manual_seed(0)
    net, x = Pipelined(pt, [0], training=True), torch.randn(4, 4)
    host = nn.Linear(4, 4)
    host.load_state_dict(net.layers[0].state_dict())
    hyper = dict(lr=0.05, alpha=0.9, eps=1e-3, momentum=0.9)
    reference = RMSpropTF([{"params": list(host.parameters()), "weight_decay": 1e-2}], **hyper)
    for _ in range(2):
        reference.zero_grad()
        (host(x) ** 2).mean().backward()
        reference.step()
    optimizer = pt.optim.RMSprop([{"params": list(net.parameters()), "weight_decay": 1e-2}], **hyper,
                                 use_tf_variant=True)
    model = pt.trainingModel(net, options=pt.Options(), optimizer=optimizer)
    for _ in range(2):
        model(x)
    model.copyWeightsToHostIfNeeded()
    for name, want in host.state_dict().items():
        torch.testing.assert_close(net.layers[0].state_dict()[name], want, rtol=1e-5, atol=1e-6)
    model.destroy()


# ---------------------------------------------------------------------------------------------- DataLoader
def test_dataloader_combined_batch_and_termination(impl):
    pt = impl.poptorch
    opts = pt.Options().deviceIterations(2).replicationFactor(2)
    opts.Training.gradientAccumulation(3)
    data = torch.utils.data.TensorDataset(torch.arange(100).float(), torch.arange(100))
    loader = pt.DataLoader(opts, data, batch_size=2, mode=pt.DataLoaderMode.AsyncRebatched, rebatched_worker_size=4)
    assert loader.combinedBatchSize == 24 and len(loader) == 4
    assert [len(b[0]) for b in loader] == [24] * 4
    with pytest.raises(AttributeError, match="frozen"):
        opts.deviceIterations(1)
    loader.terminate()
    with impl.rejects(PoptorchError, "terminated"):
        next(iter(loader))  # an asynchronous loader is finished once terminated
    with pytest.raises(AssertionError):
        pt.DataLoader(pt.Options(), data, batch_size=2, mode=pt.DataLoaderMode.AsyncRebatched,
                      rebatched_worker_size=3)


# ------------------------------------------------------------------------------------------------- popdist
def test_popdist_options_are_poptorch_options(impl, monkeypatch):
    if impl.fake:
        install(monkeypatch, popdist={"instance": 0, "instances": 2, "total_replicas": 4, "ipus_per_replica": 1})
    popdist = pytest.importorskip("popdist")
    if not popdist.isPopdistEnvSet():
        pytest.skip("not started by poprun")
    popdist.init()
    import popdist.poptorch

    opts = popdist.poptorch.Options(ipus_per_replica=popdist.getNumIpusPerReplica())
    assert opts.replication_factor == popdist.getNumLocalReplicas()
    assert opts.Distributed.numProcesses == popdist.getNumInstances()
    opts.replicationFactor(opts.replication_factor)  # allowed (the backend leaves it to poprun)


# ------------------------------------------------------------------------------------------------ end to end
TINY = TINY_MODEL + [
    "train.backend=ipu", "data.dataset=generated", "data.generated_samples=24", "data.generated_classes=10",
    "data.workers=0", "data.val_subset=8", "train.resolution=16", "train.micro_batch_size=2",
    "train.gradient_accumulation=3", "train.epochs=1", "optimizer.reference_batch=256", "schedule.name=cosine",
    "schedule.warmup_epochs=0", "logging.wandb=disabled", "logging.log_every=1", "ipu.dataloader_mode=sync"]


def _args(items):
    out = []
    for item in items:
        out += ["--set", item]
    return out


def test_compile_only_for_an_offline_target(impl, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny resolution breaks the paper's mod-32 rule on purpose
        assert ipu_main(_args(TINY + [f"precision.compute={impl.precision}"]) + ["--compile-only"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["compiled"] is True


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["[{start: stem, ipu: 0}]",
                                      "[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 1, recompute: true}]"],
                         ids=["one-ipu", "two-stage-pipeline"])
def test_a_few_training_steps_and_validation(impl, tmp_path, pipeline):
    impl.needs_ipus()
    items = TINY + [f"logging.run_dir={tmp_path}", f"precision.compute={impl.precision}", f"ipu.pipeline={pipeline}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(_args(items)) == 0
    (run,) = tmp_path.iterdir()
    state = load_checkpoint(run / "checkpoints" / "train-final.pt")
    assert state["backend"]["kind"] == "ipu" and state["backend"]["optimizer"]["state"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/top1@16" in m for m in metrics)


@pytest.mark.parametrize("extra", [
    ["ipu.outer_fragment_schedule=serial"],  # the plan leaves merging off: PopART refuses it with serial
    ["optimizer.name=sgd", "optimizer.clip_grad_norm=1.0",
     "ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 1}]"],  # a clipped pipeline, default schedule
], ids=["serial-schedule", "clipped-pipeline"])
def test_compile_only_with_replicas_and_an_outer_fragment_schedule(impl, extra):
    """With several replicas the plan sets PopART's outer-fragment schedule: what it sends compiles."""
    items = TINY + [f"precision.compute={impl.precision}", "ipu.replicas=2"] + extra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ipu_main(_args(items) + ["--compile-only"]) == 0


def test_an_exported_executable_loads_back_into_poptorch(impl, tmp_path):
    """docs/inference.md: PopTorch 3.4 loads an executable written by ``compileAndExport`` back into an inference
    model of the same network (``loadExecutable``; python/_poplar_executor.py and tests/precompilation_test.py)."""
    if impl.fake:
        pytest.skip("the project never loads an executable back, so the fake does not model loadExecutable")
    impl.needs_ipus()
    pt = impl.poptorch
    torch.manual_seed(0)
    model, x = Pipelined(pt, [0]).eval(), torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "model.popef"
    exporter = pt.inferenceModel(model, options=pt.Options().useOfflineIpuTarget())
    exporter.compileAndExport(str(path), x, export_model=False)
    exporter.destroy()
    loaded = pt.inferenceModel(model, options=pt.Options())
    loaded.loadExecutable(str(path))
    torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
    loaded.destroy()


def test_ipu_backend_without_poptorch_says_how_to_get_it(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "poptorch", None)
    assert ipu_main(_args(TINY) + ["--compile-only"]) == 2
    assert "ships only with the Poplar SDK" in capsys.readouterr().err
