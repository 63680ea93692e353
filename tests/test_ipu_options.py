"""IPU options as pure logic (no PopTorch): recipe validation, errors, batch arithmetic, option plans, --describe."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
import torch

from ipu_options.__main__ import main as ipu_main
from ipu_options.config import PHASE_FIELDS
from ipu_options.plan import Call, New, PlanError, Symbol, needs_own_launch, training_calls, validation_calls
from models import build_model, native_resolution, split_points
from models.splits import split_point_names
from train.config import ConfigError, load_config
from train.run_plan import plan_run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs" / "ipu").glob("pod*.yml") if p.name != "pod16-base.yml")
B0_HALF = ROOT / "configs" / "ipu" / "pod16-b0-g16-ln-pn-half.yml"

# A small valid IPU config to break one key at a time.
SMALL = ["train.backend=ipu", "model.name=efficientnet-b0", "model.group_dim=16", "model.expand_ratio=4",
         "model.norm=layer", "model.proxy_norm=true", "model.num_classes=10", "train.micro_batch_size=4",
         "train.gradient_accumulation=3", "precision.compute='16.16'",
         "ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 1}]"]


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch):
    """``$POPTORCH_CACHE_DIR`` changes the executable-cache calls; these tests set it themselves."""
    monkeypatch.delenv("POPTORCH_CACHE_DIR", raising=False)


def plans(cfg):
    """Each phase's IPU plan, from the validation pass every entry point runs."""
    return [phase.ipu for phase in plan_run(cfg).phases]


def small(*extra):
    return load_config(None, SMALL + list(extra))


def _build_cheaply(model_cfg):
    """The real network, on the meta device where torch supports it (only names and structure are needed)."""
    try:
        with torch.device("meta"):
            return build_model(model_cfg)
    except (AttributeError, TypeError, RuntimeError):
        return build_model(model_cfg)


_SPLITS: Dict[Tuple, Tuple[List[str], Set[str]]] = {}


def real_split_points(model_cfg):
    key = (model_cfg.name, model_cfg.group_dim, model_cfg.expand_ratio, model_cfg.norm, model_cfg.proxy_norm)
    if key not in _SPLITS:
        model = _build_cheaply(model_cfg)
        _SPLITS[key] = (split_points(model), {n for n, _ in model.named_modules()})
    return _SPLITS[key]


# ------------------------------------------------------------------------------------------------- recipes
def test_there_is_a_recipe_for_every_size_and_variant():
    names = {p.stem for p in RECIPES}
    for b in range(6):
        for variant in ("g16-ln-pn-half", "g16-gn-native", "g1-gn-baseline"):
            assert f"pod16-b{b}-{variant}" in names
    assert {"pod64-b0-g16-ln-pn-half", "pod64-b4-g16-ln-pn-half", "pod16-efficientnetv2-s-g16-ln-pn-half"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_pipeline_validates_against_the_real_model(path):
    cfg = load_config(str(path))
    assert cfg.train.backend == "ipu" and cfg.precision.compute == "16.32"
    names, modules = real_split_points(cfg.model)
    assert split_point_names(cfg.model) == names
    phase_plans = plans(cfg)
    pod = 64 if path.stem.startswith("pod64") else 16
    for plan in phase_plans:
        for stage in plan.stages:
            assert stage.start in modules  # the module BeginBlock will wrap exists
            assert stage.available_memory_proportion is None or 0 < stage.available_memory_proportion <= 1
        n, per_process = plan.ipus_per_replica, plan.ipus_per_process
        assert n & (n - 1) == 0 and per_process & (per_process - 1) == 0 and per_process <= 64
        if n > 1:
            assert plan.gradient_accumulation >= 2 * n - 1
        assert plan.eval_device_iterations >= n
        assert plan.replicas * n == pod  # the whole POD, every phase
        assert not needs_own_launch(phase_plans[0], plan)  # the fine-tune runs in the same poprun launch
    main = phase_plans[0]
    assert main.global_batch == 768
    assert main.micro_batch_size * main.gradient_accumulation * main.replicas == 768
    if "baseline" in path.stem:
        assert len(phase_plans) == 1
    else:
        assert [p.phase for p in phase_plans] == ["train", "finetune"]
        assert phase_plans[1].global_batch == 512
        assert phase_plans[1].resolution == (cfg.finetune.resolution or native_resolution(cfg.model.name))
    if "half" in path.stem:
        assert main.resolution < phase_plans[1].resolution


def test_paper_geometries_are_the_published_ones():
    b0 = plans(load_config(str(B0_HALF)))[0]
    assert (b0.micro_batch_size, b0.gradient_accumulation, b0.replicas, b0.ipus_per_replica) == (24, 4, 8, 2)
    assert [s.start for s in b0.stages] == ["stem", "blocks.3.1"]  # TF block4b
    assert b0.resolution == 160
    b4 = plans(load_config(str(ROOT / "configs/ipu/pod16-b4-g16-ln-pn-half.yml")))[0]
    assert (b4.micro_batch_size, b4.gradient_accumulation, b4.replicas, b4.ipus_per_replica) == (8, 24, 4, 4)
    assert [s.start for s in b4.stages] == ["stem", "blocks.1.2", "blocks.3.2", "blocks.5.0"]  # 2c, 4c, 6a
    assert b4.resolution == 252


# ------------------------------------------------------------------------------------------- arithmetic
def test_batch_arithmetic_per_phase():
    cfg = load_config(str(B0_HALF), ["ipu.device_iterations=3"])
    train, fine = plans(cfg)
    assert train.local_replicas == 2  # 8 replicas over 4 instances
    assert train.samples_per_call == 24 * 3 * 4 * 2  # micro x DI x GA x local replicas
    assert train.micro_batches_per_call == 3 * 4 * 2
    assert train.global_batch == 24 * 4 * 8
    assert train.eval_device_iterations == 3
    assert train.eval_samples_per_call == 24 * 3 * 2
    assert (fine.micro_batch_size, fine.gradient_accumulation, fine.global_batch) == (16, 4, 512)
    assert [s.start for s in fine.stages] == ["stem", "blocks.2.1"]  # ipu.finetune.pipeline replaces the list
    assert fine.memory_proportions() == {"IPU0": 0.15, "IPU1": 0.2}
    assert train.memory_proportions() == {"IPU0": 0.15, "IPU1": 0.15}


def test_eval_device_iterations_default_to_the_stage_count():
    (plan,) = plans(small())
    assert plan.device_iterations == 1 and plan.eval_device_iterations == 2


def test_stages_sharing_an_ipu_share_its_memory_proportion():
    (plan,) = plans(small("ipu.pipeline=[{start: stem, ipu: 0, available_memory_proportion: 0.3}, "
                          "{start: blocks.1.0, ipu: 0, recompute: true}, {start: blocks.3.0, ipu: 1}]"))
    assert plan.ipus_per_replica == 2
    assert [s.available_memory_proportion for s in plan.stages] == [0.3, 0.3, None]
    assert plan.memory_proportions() == {"IPU0": 0.3}
    assert plan.stages[1].modules[0] == "blocks.1.0" and plan.stages[1].modules[-1] == "blocks.2.1"


# ----------------------------------------------------------------------------------------------- errors
ERRORS = [
    (["ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.9.0, ipu: 1}]"],
     "ipu.pipeline[1].start: 'blocks.9.0' is not a split point of efficientnet-b0; valid split points, in "
     "execution order: stem, blocks.0.0,"),
    (["ipu.pipeline=[{start: blocks.1.0, ipu: 0}, {start: blocks.3.0, ipu: 1}]"],
     "ipu.pipeline[0].start: 'blocks.1.0': the first stage must start at 'stem'"),
    (["ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 1}, {start: blocks.1.0, ipu: 1}]"],
     "ipu.pipeline[2].start: 'blocks.1.0' does not come after 'blocks.3.0' (ipu.pipeline[1]); stages must be "
     "listed in execution order"),
    (["ipu.pipeline=[{start: stem, ipu: 1}]"], "ipu.pipeline[0].ipu: 1: the first stage must run on IPU 0"),
    (["ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 2}]"],
     "ipu.pipeline[1].ipu: 2 after IPU 0 (ipu.pipeline[0]); each stage stays on the previous stage's IPU or moves "
     "to the next one"),
    (["ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 1}, {start: head, ipu: 0}]"],
     "ipu.pipeline[2].ipu: 0 after IPU 1"),
    (["ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.2.0, ipu: 1}, {start: blocks.4.0, ipu: 2}]",
      "train.gradient_accumulation=5"],
     "ipu.pipeline: the pipeline uses 3 IPUs per replica, so no number of replicas gives a process a power of two "
     "of IPUs, which PopTorch needs on hardware; use 1, 2, 4, 8, 16, 32 or 64 IPUs per replica, or "
     "ipu.auto_round_num_ipus: true"),
    (["ipu.replicas=3", "ipu.instances=1"],
     "ipu.replicas: 3 over ipu.instances: 1 host process(es) puts 3 replica(s) x 2 IPU(s) = 6 IPUs in one process; "
     "PopTorch attaches a power of two of IPUs to one process on hardware, unless ipu.auto_round_num_ipus: true "
     "rounds the allocation up; valid ipu.replicas for this layout: 1, 2, 4, 8, 16, 32"),
    (["ipu.replicas=12", "ipu.instances=2"],
     "ipu.replicas: 12 over ipu.instances: 2 host process(es) puts 6 replica(s) x 2 IPU(s) = 12 IPUs in one "
     "process; PopTorch attaches a power of two of IPUs to one process on hardware, unless ipu.auto_round_num_ipus: "
     "true rounds the allocation up; valid ipu.replicas for this layout: 2, 4, 8, 16, 32, 64"),
    (["ipu.replicas=64", "ipu.instances=1"],
     "ipu.replicas: 64 over ipu.instances: 1 host process(es) puts 64 replica(s) x 2 IPU(s) = 128 IPUs in one "
     "process; PopTorch attaches at most 64 IPUs to one process (more need distributed execution: more poprun "
     "instances); valid ipu.replicas for this layout: 1, 2, 4, 8, 16, 32"),
    (["ipu.replicas=48", "ipu.instances=1", "ipu.auto_round_num_ipus=true"],
     "= 96 IPUs in one process; PopTorch attaches at most 64 IPUs to one process"),
    (["finetune.enabled=true", "finetune.gradient_accumulation=3", "ipu.finetune={replicas: 3}"],
     "ipu.finetune.replicas: 3 over ipu.instances: 1 host process(es) puts 3 replica(s) x 2 IPU(s) = 6 IPUs"),
    (["train.gradient_accumulation=2"],
     "train.gradient_accumulation: 2 is too small for a 2-stage pipeline (ipu.pipeline); PopTorch needs at least "
     "2 x stages - 1 = 3"),
    (["ipu.available_memory_proportion=[0.1, 0.2, 0.3]"],
     "ipu.available_memory_proportion: [0.1, 0.2, 0.3] has 3 values for 2 pipeline stage(s) (ipu.pipeline); give "
     "one number for all stages or one per stage"),
    (["ipu.pipeline=[{start: stem, ipu: 0, available_memory_proportion: 0.0}, {start: blocks.3.0, ipu: 1}]"],
     "ipu.pipeline[0].available_memory_proportion: 0.0 is not in (0, 1]"),
    (["ipu.pipeline=[{start: stem, ipu: 0, available_memory_proportion: 1.5}]"],
     "ipu.pipeline[0].available_memory_proportion: 1.5 is above the maximum 1.0"),
    (["ipu.pipeline=[{start: stem, ipu: 0, available_memory_proportion: 0.2}, "
      "{start: blocks.1.0, ipu: 0, available_memory_proportion: 0.3}, {start: blocks.3.0, ipu: 1}]"],
     "ipu.pipeline[1].available_memory_proportion: 0.3 differs from 0.2 (ipu.pipeline[0].available_memory_proportion) "
     "for the same IPU 0"),
    (["ipu.eval_device_iterations=1"], "ipu.eval_device_iterations: 1 is below the 2 pipeline stages"),
    (["ipu.replicas=6", "ipu.instances=4"],
     "ipu.replicas: 6 replicas cannot be split evenly over ipu.instances: 4 host processes"),
    (["ipu.rebatched_worker_size=100"],
     "ipu.rebatched_worker_size: 100 exceeds the 12 samples of one host call"),
    (["precision.compute=fp16"], "precision.compute: 'fp16' is a torch-backend setting; with train.backend: ipu"),
    (["train.progressive={stages: 2}", "train.epochs=2"], "train.progressive: progressive resizing changes the input"),
    (["finetune.enabled=true", "finetune.gradient_accumulation=1"],
     "finetune.gradient_accumulation: 1 is too small for a 2-stage pipeline"),
    (["finetune.enabled=true", "finetune.gradient_accumulation=8",
      "ipu.finetune={pipeline: [{start: stem, ipu: 0}, {start: blocks.7.0, ipu: 1}]}"],
     "ipu.finetune.pipeline[1].start: 'blocks.7.0' is not a split point"),
    (["ipu.replicas=2", "ipu.outer_fragment_schedule=serial", "ipu.merge_collectives=true"],
     "ipu.merge_collectives: true with ipu.outer_fragment_schedule: 'serial' (ipu.replicas: 2): PopART refuses to "
     "prepare the schedule for merged all-reduces"),
    (["ipu.replicas=2", "ipu.outer_fragment_schedule=serial", "optimizer.name=sgd", "optimizer.clip_grad_norm=1.0"],
     "optimizer.clip_grad_norm: 1.0 with ipu.outer_fragment_schedule: 'serial' (ipu.replicas: 2) on a 2-IPU "
     "pipeline (ipu.pipeline): PopART cannot clip the gradients of a pipeline under the serial outer-fragment "
     "schedule; use another schedule (scheduler, overlap_cycles, overlap_memory) or turn clipping off"),
    (["finetune.enabled=true", "finetune.optimizer={clip_grad_norm: 2.0}", "ipu.replicas=2",
      "ipu.outer_fragment_schedule=serial", "ipu.merge_collectives=false"],
     "finetune.optimizer.clip_grad_norm: 2.0 with ipu.outer_fragment_schedule: 'serial'"),
]


@pytest.mark.parametrize("overrides,message", ERRORS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in
                                                           enumerate(ERRORS)])
def test_each_validation_error_names_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises((ConfigError, PlanError)) as err:  # loading the section, or planning the phase
        plans(small(*overrides))
    assert message in str(err.value)


SCHEDULE_SERIAL = Call("_Popart.set", ("accumulateOuterFragmentSettings.schedule", 1))
PREPARE_MERGING = Call("_Popart.set", ("replicatedCollectivesSettings.prepareScheduleForMergingCollectives", True))
MERGE_ALL_REDUCES = Call("_Popart.set", ("replicatedCollectivesSettings.mergeAllReduceCollectives", True))


def test_the_serial_schedule_turns_unset_merging_off_and_describe_says_so(capsys):
    """PopART refuses to prepare merged collectives under the serial outer-fragment schedule: an unset
    ipu.merge_collectives is off with serial (and on with the others), and --describe shows the choice."""
    (plan,) = plans(small("ipu.replicas=2", "ipu.outer_fragment_schedule=serial"))
    calls = training_calls(plan)
    assert SCHEDULE_SERIAL in calls and PREPARE_MERGING not in calls and MERGE_ALL_REDUCES not in calls
    (plan,) = plans(small("ipu.replicas=2", "ipu.outer_fragment_schedule=scheduler"))
    calls = training_calls(plan)
    assert PREPARE_MERGING in calls and MERGE_ALL_REDUCES in calls and plan.notes == ()
    (plan,) = plans(small("ipu.replicas=2", "ipu.merge_collectives=false"))
    assert PREPARE_MERGING not in training_calls(plan)
    assert ipu_main(["--config", str(B0_HALF), "--set", "ipu.outer_fragment_schedule=serial", "--describe"]) == 0
    for phase in json.loads(capsys.readouterr().out)["phases"]:
        assert (phase["outer_fragment_schedule"], phase["merge_collectives"]) == ("serial", False)
        assert phase["notes"] == ["ipu.merge_collectives: off (unset): PopART cannot prepare merged all-reduces "
                                  "under ipu.outer_fragment_schedule: 'serial'"]
        calls = phase["training_options"]["calls"]
        assert {"call": "_Popart.set", "args": ["accumulateOuterFragmentSettings.schedule", 1]} in calls
        assert not any("Collectives" in str(c["args"]) for c in calls)


def test_describe_refuses_the_serial_schedule_with_merging_or_clipping_on_one_line(capsys):
    args = ["--config", str(B0_HALF), "--set", "ipu.outer_fragment_schedule=serial", "--describe"]
    assert ipu_main(args[:-1] + ["--set", "ipu.merge_collectives=true", "--describe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ipu.merge_collectives: true with ipu.outer_fragment_schedule: 'serial' "
                          "(ipu.replicas: 8)") and err.count("\n") == 1
    assert ipu_main(args[:-1] + ["--set", "optimizer.name=sgd", "--set", "optimizer.clip_grad_norm=1.0",
                                 "--describe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: optimizer.clip_grad_norm: 1.0 with ipu.outer_fragment_schedule: 'serial' "
                          "(ipu.replicas: 8) on a 2-IPU pipeline") and err.count("\n") == 1


@pytest.mark.parametrize("overrides,schedule,note", [
    (["ipu.replicas=2"], [3], None),  # the default schedule (overlap_memory) takes clipping
    (["ipu.outer_fragment_schedule=serial"], [],  # one replica: none is set, and PopTorch picks Scheduler itself
     "ipu.outer_fragment_schedule: not set with one replica; PopTorch picks Scheduler itself because the optimizer "
     "clips gradients (optimizer.clip_grad_norm)"),
    (["ipu.replicas=2", "ipu.outer_fragment_schedule=serial", "ipu.pipeline=[{start: stem, ipu: 0}]"], [1],
     "ipu.merge_collectives: off (unset): PopART cannot prepare merged all-reduces under "
     "ipu.outer_fragment_schedule: 'serial'"),  # no pipeline: serial takes clipping
], ids=["overlap-memory", "one-replica", "one-ipu"])
def test_clipping_is_allowed_wherever_popart_takes_it(overrides, schedule, note):
    (plan,) = plans(small("optimizer.name=sgd", "optimizer.clip_grad_norm=1.0", *overrides))
    assert [c.args[1] for c in training_calls(plan) if c.args and c.args[0] == SCHEDULE_SERIAL.args[0]] == schedule
    assert plan.notes == (() if note is None else (note,))


def test_auto_round_allows_three_ipus_and_asks_poptorch_to_round():
    (plan,) = plans(small("ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.2.0, ipu: 1}, "
                          "{start: blocks.4.0, ipu: 2}]", "train.gradient_accumulation=5",
                          "ipu.auto_round_num_ipus=true"))
    assert Call("autoRoundNumIPUs", (True,)) in training_calls(plan)
    (plan,) = plans(small("ipu.replicas=3", "ipu.auto_round_num_ipus=true"))  # 6 IPUs, rounded up to 8
    assert plan.ipus_per_process == 6 and Call("autoRoundNumIPUs", (True,)) in training_calls(plan)


def test_the_power_of_two_rule_is_on_the_ipus_of_one_process():
    (plan,) = plans(small("ipu.replicas=6", "ipu.instances=3"))  # 2 replicas x 2 IPUs per process
    assert (plan.ipus_per_replica, plan.local_replicas, plan.ipus_per_process) == (2, 2, 4)
    (plan,) = plans(small("ipu.replicas=32", "ipu.instances=1"))  # a whole POD64 from one process
    assert plan.ipus_per_process == 64


def test_ipu_finetune_follows_the_one_override_rule():
    """``ipu.finetune`` is generated by the rule of ``finetune.optimizer`` (train.config.overrides_of): the keys a
    phase may change, each null unless given; a key given replaces the ``ipu`` value, a null one keeps it, and
    messages name the key a value came from."""
    cfg = small("finetune.enabled=true", "ipu.device_iterations=2",
                "ipu.finetune={replicas: 2, device_iterations: null}")
    assert [f.name for f in dataclasses.fields(cfg.ipu.finetune)] == list(PHASE_FIELDS)
    train, fine = plans(cfg)
    assert (train.replicas, train.device_iterations) == (1, 2)
    assert (fine.replicas, fine.device_iterations) == (2, 2)  # set in ipu.finetune / kept from ipu
    assert (fine.keys["replicas"], fine.keys["device_iterations"]) == ("ipu.finetune.replicas",
                                                                      "ipu.device_iterations")
    assert train.keys["replicas"] == "ipu.replicas"
    assert small("finetune.enabled=true").ipu.finetune is None  # no section: every key keeps its ipu value
    with pytest.raises(ConfigError, match=r"unknown key 'ipu.finetune.instances'"):  # not in PHASE_FIELDS
        small("ipu.finetune={instances: 2}")


def test_unknown_finetune_override_key_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown key 'ipu.finetune.micro_batch_size'"):
        small("ipu.finetune={micro_batch_size: 4}")


# ------------------------------------------------------------------------------------------ option plans
CACHE = Call("enableExecutableCaching", ("runs/executable-cache",))  # the recipes have 4 or 16 instances


def expected_b0_training(popdist: bool, ga: int, amp: dict) -> list:
    head = [] if popdist else [Call("Distributed.disable"), Call("replicationFactor", (2,))]
    return head + [
        Call("deviceIterations", (1,)),
        Call("Training.gradientAccumulation", (ga,)),
        Call("Training.accumulationAndReplicationReductionType", (Symbol("ReductionType.Mean"),)),
        Call("outputMode", (Symbol("OutputMode.All"),)),
        Call("randomSeed", (0,)),
        CACHE,
        Call("modelName", ("training",)),
        Call("Precision.setPartialsType", (Symbol("torch.float16"),)),
        Call("Precision.enableStochasticRounding", (False,)),
        Call("enableStableNorm", (True,)),
        Call("setAvailableMemoryProportion", (amp,)),
        Call("_Popart.set", ("engineOptions", {"opt.internalExchangeOptimisationTarget": "balanced",
                                               "target.deterministicWorkers": "portable"})),
        Call("_Popart.set", ("scheduleNonWeightUpdateGradientConsumersEarly", True)),
        Call("_Popart.set", ("disableGradAccumulationTensorStreams", True)),
        Call("_Popart.set", ("accumulateOuterFragmentSettings.schedule", 3)),
        Call("_Popart.set", ("replicatedCollectivesSettings.prepareScheduleForMergingCollectives", True)),
        Call("_Popart.set", ("replicatedCollectivesSettings.mergeAllReduceCollectives", True)),
    ]


@pytest.mark.parametrize("popdist", [True, False])
def test_pod16_b0_recipe_option_calls_in_both_phases(popdist):
    train, fine = plans(load_config(str(B0_HALF)))
    assert training_calls(train, popdist=popdist) == expected_b0_training(popdist, 4, {"IPU0": 0.15, "IPU1": 0.15})
    assert training_calls(fine, popdist=popdist) == expected_b0_training(popdist, 4, {"IPU0": 0.15, "IPU1": 0.2})
    head = [] if popdist else [Call("Distributed.disable"), Call("replicationFactor", (2,))]
    assert validation_calls(train, popdist=popdist) == head + [
        Call("deviceIterations", (2,)),  # >= 2 pipeline stages
        Call("outputMode", (Symbol("OutputMode.All"),)),
        Call("randomSeed", (0,)),
        CACHE,
        Call("modelName", ("inference",)),
        Call("Precision.setPartialsType", (Symbol("torch.float16"),)),
        Call("enableStableNorm", (True,)),
        Call("setAvailableMemoryProportion", ({"IPU0": 0.15, "IPU1": 0.15},)),
        Call("_Popart.set", ("engineOptions", {"opt.internalExchangeOptimisationTarget": "balanced",
                                               "target.deterministicWorkers": "portable"})),
    ]
    assert not any(c.path.startswith("Training.") for c in validation_calls(fine, popdist=popdist))


def _leaves(value):
    """Every scalar inside a call argument (dicts, lists, tuples and New(...) constructions included)."""
    if isinstance(value, New):
        for call in value.calls:
            yield from _leaves(call.args)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_option_arguments_are_plain_python_values():
    """PopTorch's C++ option parser takes Python ints, floats, bools and strings, not numpy scalars (which a plan
    computed with numpy could leak), at any depth of an argument."""
    cfg = load_config(str(B0_HALF), ["ipu.executable_cache=/tmp/cache", "ipu.device_iterations=4",
                                     "ipu.offload_optimizer=true"])
    for plan in plans(cfg):
        for call in training_calls(plan) + validation_calls(plan, offline=True):
            for leaf in _leaves(call.args):
                assert type(leaf) in (int, float, bool, str, Symbol) or leaf is None, (call, type(leaf))


def test_conv_options_are_merged_not_clobbered():
    (plan,) = plans(small("ipu.conv_dithering=true"))
    calls = training_calls(plan)
    paths = [c.path for c in calls]
    partials = paths.index("Precision.setPartialsType")
    merged = calls.index(Call("_Popart.set", ("convolutionOptions", {"partialsType": "half",
                                                                     "enableConvDithering": "true"})))
    assert merged > partials  # set last, with the partials type kept
    assert "Training.setConvolutionDithering" not in paths


def test_profiling_is_merged_into_the_engine_options():
    (plan,) = plans(small("ipu.profile_dir=/tmp/prof"))
    engine = [c.args[1] for c in training_calls(plan) if c.args and c.args[0] == "engineOptions"]
    assert engine == [{"opt.internalExchangeOptimisationTarget": "balanced", "target.deterministicWorkers": "portable",
                       "autoReport.all": "true", "autoReport.directory": "/tmp/prof", "profiler.format": "v3"}]


def test_recomputation_settings():
    (piped,) = plans(small("ipu.pipeline=[{start: stem, ipu: 0, recompute: true}, {start: blocks.3.0, ipu: 1}]"))
    assert not any(c.args and c.args[0] in ("autoRecomputation", "explicitRecomputation") for c in
                   training_calls(piped))  # PopTorch's pipeline recomputation default
    (single,) = plans(small("ipu.pipeline=[{start: stem, ipu: 0, recompute: true}]"))
    calls = training_calls(single)
    assert Call("_Popart.set", ("explicitRecomputation", True)) in calls
    assert Call("_Popart.set", ("autoRecomputation", 4)) in calls
    (forced,) = plans(small("ipu.recomputation=standard"))
    assert Call("_Popart.set", ("autoRecomputation", 1)) in training_calls(forced)


def test_optimizer_state_location_and_offline_target():
    (plan,) = plans(small("ipu.offload_optimizer=true", "ipu.replicated_tensor_sharding=true"))
    location = New("TensorLocationSettings", (Call("useOnChipStorage", (False,)),
                                              Call("useReplicatedTensorSharding", (True,))))
    assert Call("TensorLocations.setOptimizerLocation", (location,)) in training_calls(plan)
    assert Call("useOfflineIpuTarget", (2,)) in validation_calls(plan, offline=True)
    assert Call("useOfflineIpuTarget", (2,)) not in validation_calls(plan)


STREAMS_OFF = Call("_Popart.set", ("disableOptimizerStateTensorStreams", True))


@pytest.mark.parametrize("checkpointed,epochs,validate_every,streams", [
    (True, 3, 1, True),    # checkpoints need the optimizer state
    (False, 3, 1, True),   # validation detaches the training model mid-phase: the state must leave the device
    (False, 3, 3, False),  # nothing needs it off the device: PopART's optimizer-state streams go
    (False, 1, 1, False),
])
def test_optimizer_state_streams_stay_wherever_the_state_must_leave_the_device(checkpointed, epochs,
                                                                                validate_every, streams):
    (plan,) = plans(small(f"checkpoint.optimizer_state={str(checkpointed).lower()}", f"train.epochs={epochs}",
                          f"train.validate_every={validate_every}"))
    assert plan.keep_optimizer_state is streams
    assert (STREAMS_OFF in training_calls(plan)) is not streams
    assert STREAMS_OFF not in validation_calls(plan)


def test_the_paper_recipes_keep_the_optimizer_state_in_both_phases_by_default():
    for phase in plans(load_config(str(B0_HALF))):
        assert phase.keep_optimizer_state and STREAMS_OFF not in training_calls(phase)
    train, fine = plans(load_config(str(B0_HALF), ["checkpoint.optimizer_state=false"]))
    assert train.keep_optimizer_state  # 350 epochs, validated every 4
    assert not fine.keep_optimizer_state and STREAMS_OFF in training_calls(fine)  # 2 epochs, validated at the end


def test_executable_cache_defaults_for_multi_process_recipes(monkeypatch):
    single = small()
    (plan,) = plans(single)
    assert plan.executable_cache is None
    assert not any(c.path == "enableExecutableCaching" for c in training_calls(plan) + validation_calls(plan))
    (plan,) = plans(small("ipu.replicas=4", "ipu.instances=2", "logging.run_dir=/scratch/runs"))
    assert plan.executable_cache == "/scratch/runs/executable-cache"
    assert Call("enableExecutableCaching", ("/scratch/runs/executable-cache",)) in validation_calls(plan)
    (plan,) = plans(small("ipu.executable_cache=/localdata/cache"))
    assert Call("enableExecutableCaching", ("/localdata/cache",)) in training_calls(plan)
    monkeypatch.setenv("POPTORCH_CACHE_DIR", "/localdata/env-cache")  # poptorch.Options() reads it itself
    (plan,) = plans(small("ipu.replicas=4", "ipu.instances=2"))
    assert plan.executable_cache is None and plan.to_json()["executable_cache"] == "/localdata/env-cache"
    assert not any(c.path == "enableExecutableCaching" for c in training_calls(plan))


# ---------------------------------------------------------------------------------------------- describe
def test_describe_prints_one_json_document_for_both_phases(capsys):
    assert ipu_main(["--config", str(B0_HALF), "--describe"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "efficientnet-b0" and doc["precision"] == "16.32"
    train, fine = doc["phases"]
    assert train["stages"] == [
        {"stage": 0, "ipu": 0, "start": "stem", "available_memory_proportion": 0.15, "recompute": False},
        {"stage": 1, "ipu": 1, "start": "blocks.3.1", "available_memory_proportion": 0.15, "recompute": False}]
    assert (train["replicas"], train["gradient_accumulation"], train["device_iterations"]) == (8, 4, 1)
    assert (train["micro_batch_size"], train["global_batch"], train["resolution"]) == (24, 768, 160)
    assert (fine["micro_batch_size"], fine["global_batch"], fine["resolution"]) == (16, 512, 224)
    assert train["launch"].startswith("poprun --num-instances 4 --num-replicas 8 --ipus-per-replica 2 ")
    assert train["training_options"]["constructor"] == {"new": "popdist.poptorch.Options",
                                                        "kwargs": {"ipus_per_replica": 2}}
    calls = train["training_options"]["calls"]
    assert {"call": "Training.gradientAccumulation", "args": [4]} in calls
    assert {"call": "outputMode", "args": ["OutputMode.All"]} in calls
    assert {"call": "outputMode", "args": ["OutputMode.All"]} in fine["validation"]["options"]["calls"]
    assert fine["validation"]["device_iterations"] == 2
    assert (train["ipus_per_process"], train["executable_cache"]) == (4, "runs/executable-cache")
    assert train["optimizer_state_in_checkpoints"] is True


def test_describe_launches_a_fine_tune_of_another_geometry_on_its_own(capsys):
    """Under poprun every phase must match the launch (checked before the first step), so a fine-tune phase with
    its own replicas gets its own command, and the training phase's command leaves the fine-tune out."""
    args = ["--config", str(B0_HALF), "--set", "ipu.finetune.replicas=16", "--set",
            "ipu.finetune.pipeline=[{start: stem, ipu: 0}]", "--set", "ipu.finetune.available_memory_proportion=0.2",
            "--describe"]
    assert ipu_main(args) == 0
    train, fine = (phase["launch"] for phase in json.loads(capsys.readouterr().out)["phases"])
    config = f"--config {B0_HALF}"
    assert train == ("poprun --num-instances 4 --num-replicas 8 --ipus-per-replica 2 python -m train "
                     f"{config} --set finetune.enabled=false")
    assert fine == ("poprun --num-instances 4 --num-replicas 16 --ipus-per-replica 1 python -m train.finetune "
                    f"--checkpoint <run>/checkpoints/train-final.pt {config}")


def test_describe_refuses_more_ipus_in_one_process_than_poptorch_attaches(capsys):
    args = ["--config", str(B0_HALF), "--set", "ipu.replicas=3", "--set", "ipu.instances=1", "--describe"]
    assert ipu_main(args) == 2
    assert "= 6 IPUs in one process" in capsys.readouterr().err


def test_describe_reports_config_errors_with_exit_code_2(capsys):
    assert ipu_main(["--config", str(B0_HALF), "--set", "train.gradient_accumulation=1", "--describe"]) == 2
    assert "train.gradient_accumulation: 1 is too small" in capsys.readouterr().err


@pytest.mark.slow
def test_describe_runs_without_poptorch_installed():
    code = ("import sys, json, runpy; sys.modules['poptorch'] = None; sys.modules['popdist'] = None; "
            "sys.argv = ['ipu_options', '--config', sys.argv[1], '--describe']; "
            "runpy.run_module('ipu_options', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, str(B0_HALF)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["phases"]) == 2
