"""The IPU backend against the strict fake of PopTorch/PopDist/Horovod (tests/fake_poptorch), looking inside the
fake: the option builders on its Options, pipeline annotation, optimizer state, pods, and training end to end.
What PopTorch itself accepts or refuses is pinned by the shared suite in test_ipu_contract.py."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_MODEL
from fake_poptorch import PoptorchError, cpu_has_half_convolutions, install
from ipu_options.apply import apply_calls, build_options
from ipu_options.pipeline import FloatGroupNorm, annotate_pipeline, prepare_precision
from ipu_options.plan import PlanError, training_calls
from models import build_model
from train.backends import build_network, process_rank
from train.backends import make_backend as backend_for
from train.backends.torch_backend import BackendError
from train.checkpoint import load_checkpoint
from train.cli import main as train_main
from train.config import ConfigError, load_config
from train.ipu_plan import resolve_phase
from train.phases import run_phases
from train.run_plan import plan_launch, plan_run
from train.task import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
B0_HALF = ROOT / "configs" / "ipu" / "pod16-b0-g16-ln-pn-half.yml"



HALF_ON_CPU = cpu_has_half_convolutions()
needs_half = pytest.mark.needs_new_torch  # half CPU convs (the IPU runs half itself)
PRECISION = "'16.32'" if HALF_ON_CPU else "fp32"

# A tiny G16-LN+PN network on generated data, pipelined over 2 (fake) IPUs.
TINY = TINY_MODEL + [
    "train.backend=ipu", "data.dataset=generated", "data.generated_samples=24", "data.generated_classes=10",
    "data.workers=0", "train.resolution=16", "train.micro_batch_size=2", "train.gradient_accumulation=3",
    "train.epochs=1", "train.weight_avg_decay=null", "optimizer.lr=0.01", "optimizer.reference_batch=256",
    "schedule.name=cosine", "schedule.warmup_epochs=0", "logging.wandb=disabled", "logging.log_every=1",
    f"precision.compute={PRECISION}", "ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 1, "
    "recompute: true}]"]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.delenv("POPTORCH_CACHE_DIR", raising=False)
    return install(monkeypatch)


def tiny(*extra):
    return load_config(None, TINY + list(extra))


def make_backend(cfg, phase_index=0):
    """The backend of one phase, planned as ``python -m train`` plans it (for this process's launch)."""
    phase = plan_launch(cfg).phases[phase_index]
    torch.manual_seed(0)
    return backend_for(cfg, phase, build_network(cfg))


# ---------------------------------------------------------------------------------- builders on Options
def test_b0_recipe_options_in_both_phases(fake):
    cfg = load_config(str(B0_HALF))
    train_plan, fine_plan = [resolve_phase(cfg, p) for p in run_phases(cfg)]
    opts = build_options(fake, train_plan, training=True)
    assert (opts.device_iterations, opts.replication_factor, opts.Training.gradient_accumulation) == (1, 2, 4)
    assert opts.output_mode == int(fake.OutputMode.All) == 2
    assert opts.Training.accumulation_and_replication_reduction_type == fake.ReductionType.Mean
    assert opts.random_seed == 0 and opts.Distributed.numProcesses == 1
    assert opts.available_memory_proportion == {"IPU0": 0.15, "IPU1": 0.15}
    popart = opts._Popart.options
    assert popart["convolutionOptions"] == {"partialsType": "half"} and popart["partialsTypeMatMuls"] == "half"
    assert popart["engineOptions"]["target.deterministicWorkers"] == "portable"
    assert popart["enableStochasticRounding"] is False and popart["enableStableNorm"] is True
    assert popart["accumulateOuterFragmentSettings.schedule"] == 3
    assert popart["cachePath"] == "runs/executable-cache" and popart["enableEngineCaching"] is True
    assert "disableOptimizerStateTensorStreams" not in popart  # the recipes checkpoint the optimizer state
    val = build_options(fake, train_plan, training=False)
    assert (val.device_iterations, val.Training.gradient_accumulation) == (2, 1)
    assert val.output_mode == int(fake.OutputMode.All)
    fine = build_options(fake, fine_plan, training=True)
    assert fine.available_memory_proportion == {"IPU0": 0.15, "IPU1": 0.2}
    # Never mutate frozen options: replaying onto a frozen object fails loudly.
    fake.trainingModel(nn.Linear(2, 2), options=opts)
    with pytest.raises(AttributeError, match="frozen"):
        apply_calls(opts, training_calls(train_plan), fake)


def test_conv_dithering_keeps_the_partials_type(fake):
    cfg = tiny("ipu.conv_dithering=true", "ipu.partials_type=half")
    opts = build_options(fake, resolve_phase(cfg, run_phases(cfg)[0]), training=True)
    assert opts._Popart.options["convolutionOptions"] == {"partialsType": "half", "enableConvDithering": "true"}
    fake.trainingModel(nn.Linear(2, 2), options=opts).compile(torch.zeros(3, 2))  # passes the option registry


def test_offload_and_offline_target(fake):
    cfg = tiny("ipu.offload_optimizer=true", "ipu.replicated_tensor_sharding=true")
    plan = resolve_phase(cfg, run_phases(cfg)[0])
    opts = build_options(fake, plan, training=True, offline=True)
    assert opts.TensorLocations.location_optimizer == {"onChip": 0, "useReplicatedTensorSharding": 1}
    assert opts.connection_type == int(fake.ConnectionType.Never)


def test_popdist_options_keep_poprun_replication_factor(fake, monkeypatch):
    fake = install(monkeypatch, popdist={"instance": 1, "instances": 4, "total_replicas": 8, "ipus_per_replica": 2})
    import popdist

    popdist.init()
    cfg = load_config(str(B0_HALF))
    plan = resolve_phase(cfg, run_phases(cfg)[0])
    assert "replicationFactor" not in [c.path for c in training_calls(plan, popdist=True)]
    opts = build_options(fake, plan, training=True, popdist=popdist)
    assert opts.replication_factor == 2 and opts.Distributed.processId == 1 and opts.Distributed.numProcesses == 4


def test_plain_options_ignore_mpi_variables(fake, monkeypatch):
    """``poptorch.Options()`` takes the process count and index from OMPI_*; the backend distributes only
    through poprun, so it disables that."""
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert (fake.Options().Distributed.numProcesses, fake.Options().Distributed.processId) == (4, 3)
    cfg = tiny()
    opts = build_options(fake, resolve_phase(cfg, run_phases(cfg)[0]), training=True)
    assert (opts.Distributed.numProcesses, opts.Distributed.processId) == (1, 0)


# ----------------------------------------------------------------------------------- pipeline and precision
def test_begin_block_lands_on_the_configured_modules(fake):
    cfg = load_config(str(B0_HALF))
    plan = resolve_phase(cfg, run_phases(cfg)[0])
    model = build_model(load_config(str(B0_HALF), ["model.num_classes=10"]).model)
    checkpointed = annotate_pipeline(model, plan.stages, fake)
    assert model.stem._fake_block == ("stage0", 0)
    assert model.get_submodule("blocks.3.1")._fake_block == ("stage1", 1)
    blocks = [n for n, m in model.named_modules() if getattr(m, "_fake_block", None)]
    assert blocks == ["stem", "blocks.3.1"]
    assert checkpointed == []
    with pytest.raises(PoptorchError):
        annotate_pipeline(model, plan.stages, fake)  # a module gets one block only
    fake.STATE.block_entries.clear()
    model(torch.zeros(1, 3, 32, 32))
    assert fake.STATE.block_entries == [("stage0", 0), ("stage1", 1)]


def test_recompute_stage_checkpoints_every_block_output_in_training_only(fake):
    cfg = tiny()
    plan = resolve_phase(cfg, run_phases(cfg)[0])
    model = build_model(cfg.model)
    checkpointed = annotate_pipeline(model, plan.stages, fake)
    assert checkpointed[0] == "blocks.3.0" and checkpointed[-1] == "head" and "classifier" not in checkpointed
    model.eval()(torch.zeros(1, 3, 16, 16))  # the inference graph has nothing to recompute
    assert fake.STATE.checkpoints == 0
    model.train()(torch.zeros(1, 3, 16, 16))
    assert fake.STATE.checkpoints == len(checkpointed)


@needs_half
@pytest.mark.parametrize("compute", ["16.16", "16.32"])
def test_precision_keeps_norms_and_proxy_statistics_in_float(compute):
    cfg = tiny()
    model = build_model(cfg.model, "ipu")
    ref = ClassificationTask(build_model(cfg.model, "ipu"), 10)
    ref.model.load_state_dict(model.state_dict())
    task = ClassificationTask(model, 10)
    task.dtype = prepare_precision(model, compute, "float")
    assert task.dtype == torch.float16
    conv_dtype = model.stem.conv.weight.dtype
    assert conv_dtype == (torch.float16 if compute == "16.16" else torch.float32)
    assert model.stem.norm.act.weight.dtype == torch.float32 and model.stem.norm.act.quantiles.dtype == torch.float32
    images = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([1, 2])
    task.eval(), ref.eval()
    out = model(task.normalize(images))
    assert out.dtype == torch.float16  # half compute all the way to the logits
    assert abs(task(images, labels)[0].item() - ref(images, labels)[0].item()) < 0.05


@pytest.mark.parametrize("compute, float_norms", [("16.16", True), ("16.32", True), ("16.16", False)])
def test_float_norms_become_float_classes_without_hooks(compute, float_norms):
    """The precision setting is applied once, by swapping each GroupNorm/BatchNorm for its float-computing class
    that holds the same tensors under the same keys; no module is left with a forward hook."""
    cfg = tiny()
    model = build_model(cfg.model, "ipu")
    keys = list(model.state_dict())
    norms = {n: m for n, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))}
    tensors = {n: [id(t) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]] for n, m in norms.items()}
    prepare_precision(model, compute, "float" if float_norms else "half")
    assert list(model.state_dict()) == keys
    expected = FloatGroupNorm if float_norms else nn.GroupNorm
    for name, old in norms.items():
        new = model.get_submodule(name)
        assert type(new) is expected and new.training == old.training
        assert [id(t) for t in [*new.parameters(recurse=False), *new.buffers(recurse=False)]] == tensors[name]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_ipu_backend_refuses_a_model_built_for_another_device(fake):
    cfg = tiny()
    with pytest.raises(BackendError, match="the IPU runs the norm units as plain modules, but this model's are "
                                           "function"):
        backend_for(cfg, run_phases(cfg)[0], build_model(cfg.model, "cpu"))


# ----------------------------------------------------------------------------------------------- backend
@pytest.mark.slow
def test_backend_geometry_data_and_lr_updates(fake):
    cfg = tiny("data.generated_samples=40")
    backend = make_backend(cfg)
    assert (backend.global_batch, backend.micro_batches_per_call, backend.steps_per_call) == (6, 3, 1)
    from data import build_dataset, build_transform

    dataset = build_dataset(cfg.data, "train", build_transform("train", 16, cfg.data))
    assert backend.calls_per_epoch(dataset) == 40 // 6
    batches = list(backend.train_loader(dataset, seed=0, epoch=0, start_call=2))
    assert len(batches) == 40 // 6 - 2 and all(len(b[1]) == 6 and b[0].dtype == torch.uint8 for b in batches)
    lr0 = backend.optimizer.param_groups[0]["lr"]
    stats = backend.train_call(*batches[0], None)
    assert stats.samples == 6 and stats.steps == 1 and np.isfinite(stats.loss)
    backend.set_lr(lr0)
    assert backend.training_model.set_optimizer_calls == 0  # unchanged: no setOptimizer
    backend.set_lr(lr0 / 2)
    backend.set_lr(lr0 / 2)
    assert backend.training_model.set_optimizer_calls == 1
    assert fake.STATE.identity_loss_calls and set(fake.STATE.identity_loss_calls) == {"none"}
    assert backend.state_dict()["kind"] == "ipu"
    with pytest.warns(UserWarning, match="optimizer starts afresh"):
        backend.load_state_dict({"optimizer": {}, "scaler": None})
    backend.close()


# ------------------------------------------------------------------------------------------ optimizer state
IMAGES, LABELS = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), \
    torch.arange(6) % 10


@pytest.mark.slow
def test_checkpoints_hold_the_device_optimizer_state_through_validation_and_resume_it(fake):
    backend = make_backend(tiny())
    backend.train_call(IMAGES, LABELS, None)
    backend.eval_call(IMAGES[:4], LABELS[:4])  # detaches the training model; the next call attaches it again
    backend.train_call(IMAGES, LABELS, None)
    saved = backend.state_dict()["optimizer"]
    assert {int(s["step"]) for s in saved["state"].values()} == {2}  # the device's state, kept over the detach
    square = [s["mean_square"] for s in saved["state"].values()]
    assert any(not torch.equal(m, torch.ones_like(m)) for m in square)
    backend.close()
    resumed = make_backend(tiny())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped
        resumed.load_state_dict({"kind": "ipu", "optimizer": saved, "lr": 0.01})
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["velocity"], saved["state"][0]["velocity"])
    resumed.close()


@pytest.mark.slow
def test_weights_only_checkpoints_say_what_a_resume_loses(fake):
    backend = make_backend(tiny("checkpoint.optimizer_state=false"))  # one epoch: nothing validates mid-phase
    assert not backend.plan.keep_optimizer_state
    assert backend.train_opts._Popart.options["disableOptimizerStateTensorStreams"] is True
    backend.train_call(IMAGES, LABELS, None)
    assert backend.state_dict()["optimizer"] is None
    with pytest.warns(UserWarning, match="holds weights only .* restart from their initial values"):
        backend.load_state_dict({"kind": "ipu", "optimizer": None, "lr": 0.01})
    with pytest.warns(UserWarning, match="cannot be uploaded"):
        backend.load_state_dict({"kind": "ipu", "optimizer": {"state": {}, "param_groups": []}, "lr": 0.01})
    backend.eval_call(IMAGES[:4], LABELS[:4])
    with pytest.raises(BackendError, match="would restart the optimizer state; set checkpoint.optimizer_state"):
        backend.train_call(IMAGES, LABELS, None)
    backend.close()


def test_eval_pads_the_last_call_and_counts_every_sample_once(fake):
    cfg = tiny()
    backend = make_backend(cfg)
    from data import build_dataset, build_transform

    val = build_dataset(cfg.data, "val", build_transform("eval", 16, cfg.data)).subset(11)
    batches = list(backend.eval_loader(val))
    per_call = backend.plan.eval_samples_per_call  # micro 2 x eval DI 2
    assert per_call == 4 and len(batches) == 3 and (batches[-1][1] == -1).sum() == 1
    stats = [backend.eval_call(images, labels) for images, labels in batches]
    assert sum(s.samples for s in stats) == 11
    assert fake.STATE.attached is backend.eval_models[16]  # the training model is not attached meanwhile
    backend.close()
    assert fake.STATE.attached is None


@pytest.mark.slow
@needs_half
def test_host_model_keeps_fp32_weights_and_syncs(fake):
    cfg = tiny("precision.compute='16.16'")
    backend = make_backend(cfg)
    host = backend.host_model()
    before = {k: v.clone() for k, v in host.state_dict().items()}
    images = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    backend.train_call(images, torch.arange(6) % 10, None)
    assert backend.ipu_task.model.stem.conv.weight.dtype == torch.float16
    after = backend.host_model().state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    backend.set_weights(before)
    assert torch.equal(backend.ipu_task.model.stem.conv.weight.float(), before["stem.conv.weight"].half().float())
    backend.close()


def test_without_poprun_one_process_drives_every_replica(fake):
    with pytest.warns(UserWarning, match="not started by poprun"):
        backend = make_backend(tiny("ipu.replicas=4", "ipu.instances=2"))
    assert backend.plan.local_replicas == 4 and backend.train_opts.replication_factor == 4
    assert backend.global_batch == 2 * 3 * 4 and backend.world_size == 1
    # Several instances in the recipe: compiled executables are cached for all of them.
    assert backend.train_opts._Popart.options["cachePath"] == "runs/executable-cache"
    backend.close()


def test_without_poprun_the_ipus_of_every_replica_must_fit_one_process(fake):
    with pytest.warns(UserWarning, match="not started by poprun"):
        with pytest.raises(PlanError, match=r"ipu.replicas: 6 over ipu.instances: 1 host process\(es\) \(this "
                                              r"process was not started by poprun.*= 12 IPUs in one process"):
            make_backend(tiny("ipu.replicas=6", "ipu.instances=3"))  # 4 IPUs per instance, 12 in one process


def test_poptorch_cache_dir_reaches_the_options(fake, monkeypatch):
    monkeypatch.setenv("POPTORCH_CACHE_DIR", "/localdata/cache")
    with pytest.warns(UserWarning, match="not started by poprun"):
        backend = make_backend(tiny("ipu.replicas=2", "ipu.instances=2"))
    assert backend.train_opts._Popart.options["cachePath"] == "/localdata/cache"
    assert backend.eval_opts._Popart.options["enableEngineCaching"] is True
    backend.close()


# ------------------------------------------------------------------------------------------------- pods
POD = {"instance": 1, "instances": 2, "total_replicas": 2, "ipus_per_replica": 2}


def test_pod_instance_partitions_data_broadcasts_and_reduces(monkeypatch):
    fake = install(monkeypatch, popdist=POD)
    cfg = tiny("ipu.replicas=2", "ipu.instances=2", "data.generated_samples=48")
    assert process_rank() == 1
    backend = make_backend(cfg)
    assert (backend.rank, backend.world_size, backend.is_main) == (1, 2, False)
    assert fake.STATE.hvd["broadcast_parameters"] == 1 and len(fake.STATE.hvd["broadcasts"]) == 1
    assert backend.train_opts.replication_factor == 1 and backend.train_opts.Distributed.processId == 1
    from data import build_dataset, build_transform

    dataset = build_dataset(cfg.data, "train", build_transform("train", 16, cfg.data))
    mine = backend.train_loader(dataset, seed=0, epoch=0, start_call=0).loader.dataset.indices
    assert backend.calls_per_epoch(dataset) == 48 // (6 * 2) == len(mine) // 6
    from data import ShardedBatchSampler

    other = ShardedBatchSampler(48, 6, shuffle=True, seed=0, rank=0, world_size=2, drop_last=True)
    assert not set(mine) & {k.index for b in other for k in b}  # disjoint shards
    totals = backend.sum_across_processes(torch.tensor([1.0, 2.0]))
    assert totals.tolist() == [2.0, 4.0] and fake.STATE.hvd["allreduces"] == 1
    backend.close()


def test_pod_launch_must_match_the_recipe(monkeypatch):
    install(monkeypatch, popdist=dict(POD, total_replicas=4))
    with pytest.raises(PlanError, match="ipu.replicas: phase 'train' asks for 2 replicas but poprun launched 4"):
        plan_launch(tiny("ipu.replicas=2", "ipu.instances=2"))
    install(monkeypatch, popdist=dict(POD, ipus_per_replica=1))
    with pytest.raises(PlanError, match="--ipus-per-replica 1"):
        plan_launch(tiny("ipu.replicas=2", "ipu.instances=2"))
    install(monkeypatch, popdist=dict(POD, instance=0, total_replicas=6))  # 3 replicas x 2 IPUs per instance
    with pytest.warns(UserWarning, match="poprun launched 2 instances"):
        with pytest.raises(PlanError, match=r"\(poprun launched 2\) puts 3 replica\(s\) x 2 IPU\(s\) = 6 IPUs"):
            make_backend(tiny("ipu.replicas=6", "ipu.instances=3"))


def test_a_fine_tune_phase_that_needs_its_own_launch_stops_the_run_before_the_first_step(monkeypatch, tmp_path):
    """Every phase is fitted to the poprun launch in the validation pass: a fine-tune phase with other replicas
    stops ``python -m train`` before the training phase runs, naming its key and how to launch it."""
    install(monkeypatch, popdist=POD)
    cfg = tiny("ipu.replicas=2", "ipu.instances=2", "finetune.enabled=true", "finetune.resolution=16",
               "ipu.finetune={replicas: 4}")
    assert plan_run(cfg).phases[1].ipu.replicas == 4  # the recipe itself is valid (--print-config, --describe)
    with pytest.raises(PlanError, match=r"ipu.finetune.replicas: phase 'finetune' asks for 4 replicas but poprun "
                                        r"launched 2 .* runs as its own launch \(train first with --set "
                                        r"finetune.enabled=false\)"):
        plan_launch(cfg)
    args = ["--set", f"logging.run_dir={tmp_path}"]
    for item in TINY + ["ipu.replicas=2", "ipu.instances=2", "finetune.enabled=true", "finetune.resolution=16",
                        "ipu.finetune={replicas: 4}"]:
        args += ["--set", item]
    assert train_main(args) == 2
    assert not list(tmp_path.iterdir())  # stopped before the run folder, let alone a step


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_trainer_runs_both_phases_through_the_fake(fake, tmp_path):
    args = ["--set", f"logging.run_dir={tmp_path}"]
    for item in TINY + ["train.mixup_alpha=0.2", "train.cutmix_lambda=0.9", "finetune.enabled=true",
                        "finetune.resolution=24", "finetune.epochs=1", "finetune.micro_batch_size=2",
                        "finetune.gradient_accumulation=4", "data.val_subset=8", "train.weight_avg_decay=0.9",
                        "ipu.finetune={pipeline: [{start: stem, ipu: 0}, {start: blocks.4.0, ipu: 1}]}"]:
        args += ["--set", item]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny resolutions break the paper's mod-32 rule on purpose
        assert train_main(args) == 0
    (run,) = tmp_path.iterdir()
    train_final = load_checkpoint(run / "checkpoints" / "train-final.pt")
    fine_final = load_checkpoint(run / "checkpoints" / "finetune-final.pt")
    assert all(v.dtype == torch.float32 for v in fine_final["model"].values() if v.is_floating_point())
    assert train_final["backend"]["kind"] == "ipu"
    trainers = [e for e in fake.STATE.executors if e._training]
    assert [e.calls for e in trainers] == [24 // 6, 24 // 8]  # one call per host batch, each phase
    assert trainers[0].options.Training.gradient_accumulation == 3
    assert trainers[1].options.Training.gradient_accumulation == 4
    assert [e.compile_shapes[0][-1] for e in trainers] == [16, 24]
    assert len(trainers[0].compile_shapes) == 3  # images, labels and the mixing parameters
    finetune_blocks = [n for n, m in trainers[1].model.model.named_modules() if getattr(m, "_fake_block", None)]
    assert finetune_blocks == ["stem", "blocks.4.0"]
    evals = [e for e in fake.STATE.executors if not e._training]
    assert {e.compile_shapes[0][-1] for e in evals} == {16, 24} and all(e._destroyed for e in evals)
    assert all(loader._terminated for loader in fake.STATE.dataloaders)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/top1@24" in m for m in metrics)
    assert any("val/epoch_avg/top1@16" in m for m in metrics)  # averaged weights swapped in and out


def test_compile_only_compiles_every_phase_offline(fake, capsys):
    from ipu_options.__main__ import main

    overrides = []
    for item in TINY + ["finetune.enabled=true", "finetune.resolution=24", "finetune.gradient_accumulation=3"]:
        overrides += ["--set", item]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(overrides + ["--compile-only"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["phase"] for line in lines] == ["train", "finetune"]
    assert all(e.isCompiled() and e.calls == 0 for e in fake.STATE.executors)
    assert all(e.options.connection_type == int(fake.ConnectionType.Never) for e in fake.STATE.executors)
    assert len(fake.STATE.executors) == 2 + 2  # per phase: a training model, an inference model per resolution


def test_emulated_pod_instances_compile_into_one_cache_and_leave_no_compile_lock(monkeypatch, tmp_path):
    """``--compile-only`` as each of two poprun instances in turn, sharing the job's cache folder (the default
    ``<logging.run_dir>/executable-cache``). PopTorch's compile lock (docs/ipu.md, "Executable cache") is one file
    per executable, the validation wrappers included (their repr names the resolution), and the last instance
    removes each."""
    from ipu_options.__main__ import main

    monkeypatch.delenv("POPTORCH_CACHE_DIR", raising=False)
    args = []
    for item in TINY + ["ipu.replicas=2", "ipu.instances=2", f"logging.run_dir={tmp_path}",
                        "train.val_resolutions=[16, 24]"]:
        args += ["--set", item]
    cache = tmp_path / "executable-cache"
    counts = []
    for instance in range(2):
        install(monkeypatch, popdist=dict(POD, instance=instance))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(args + ["--compile-only"]) == 0
        counts.append(sorted(path.stat().st_size for path in cache.glob("*.lock")))
    assert counts == [[1, 1, 1], []]  # the training and two validation executables, passed by instance 0; then none


def test_every_instance_makes_the_same_number_of_validation_calls(fake):
    """The stop protocol agrees across instances before every validation batch, so the counts must match."""
    cfg = tiny()
    backend = make_backend(cfg)
    from data import build_dataset, build_transform

    val = build_dataset(cfg.data, "val", build_transform("eval", 16, cfg.data)).subset(13)
    counts, valid = [], 0
    backend.world_size = 3  # as three poprun instances would see it: shards of 5, 4 and 4 samples
    for rank in range(3):
        backend.rank = rank
        batches = list(backend.eval_loader(val))
        counts.append(len(batches))
        valid += sum(int((labels >= 0).sum()) for _, labels in batches)
    assert counts == [2, 2, 2] and valid == 13  # 4 samples per call
    backend.close()


def test_gradient_clipping_reaches_poptorch_as_max_grad_norm(fake):
    backend = make_backend(tiny("optimizer.name=sgd", "optimizer.clip_grad_norm=0.5"))
    assert backend.optimizer.max_grad_norm == 0.5
    backend.close()
    with pytest.raises(ConfigError, match="optimizer.clip_grad_norm: 1.0 with optimizer.name: 'rmsprop_tf' on IPUs"):
        plan_run(tiny("optimizer.clip_grad_norm=1.0"))
