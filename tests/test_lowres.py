"""Reduced-resolution training, the fine-tune phase, the resolution sweep and progressive learning."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import FASHION_MNIST, TINY_MODEL, needs_fashion
from data import build_dataset, build_transform
from data.base import SampleKey
from models import ModelConfig, build_model
from models.splits import freeze_before
from train.checkpoint import load_checkpoint
from train.cli import main as train_main
from train.config import ConfigError, load_config
from train.export import checkpoint_weights
from train.finetune import main as finetune_main
from train.phases import finetune_phase, half_resolution, run_phases, training_phase
from train.validate import main as validate_main

ROOT = Path(__file__).resolve().parents[1]

TINY = TINY_MODEL + [
    "data.workers=0", "data.crop_scale=[0.35,1.0]", "data.train_subset=2048", "data.val_subset=500",
    "train.micro_batch_size=32",
    "train.val_batch_size=250", "optimizer.lr=0.1", "optimizer.reference_batch=256", "schedule.name=cosine",
    "schedule.warmup_epochs=0.1", "logging.wandb=disabled", "logging.log_every=8", "train.seed=3",
]


def sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.mark.parametrize("b, size", [(0, 160), (1, 176), (2, 196), (3, 204), (4, 252), (5, 328), (6, 368), (7, 408)])
def test_half_resolution_table_and_rule(b, size):
    name = f"efficientnet-b{b}"
    assert half_resolution(name) == size
    cfg = load_config(None, [f"model.name={name}", "train.resolution=half"])
    assert training_phase(cfg).resolution == size
    native = finetune_phase(cfg).resolution
    assert size % 32 == native % 32  # every half size keeps the native remainder


def test_modulo_32_rule_warns_and_errors_when_strict():
    cfg = load_config(None, ["train.resolution=192", "finetune.enabled=true", "finetune.resolution=224"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_phases(cfg)  # 192 % 32 == 224 % 32: no warning
    cfg = load_config(None, ["train.resolution=176", "finetune.enabled=true", "finetune.resolution=224"])
    with pytest.warns(UserWarning, match="differ modulo 32 .16 vs 0.*stride-2"):
        run_phases(cfg)
    strict = load_config(None, ["train.resolution=176", "finetune.enabled=true", "finetune.strict_resolution=true"])
    with pytest.raises(ConfigError, match="finetune.strict_resolution"):
        run_phases(strict)


def test_a_training_size_off_the_stride_32_grid_warns_once_in_one_line(tmp_path):
    for quiet in (["train.resolution=32"], ["train.resolution=half"], ["model.name=efficientnet-b3"],
                  ["model.name=efficientnet-b3", "train.resolution=332"], ["model.name=efficientnetv2-s"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run_phases(load_config(None, quiet))  # multiples of 32, or the preset's own remainder (B3: 300 % 32)
    with pytest.warns(UserWarning, match=r"train.resolution 33 is not a multiple of 32 .*prefer e.g. 32 or 64"):
        run_phases(load_config(None, ["train.resolution=33"]))
    # Through the command line: one line per warning, no file, line or echoed source of Python's default format.
    done = subprocess.run([sys.executable, "-m", "train", "--print-config", "--set", "train.resolution=33",
                           "--set", "finetune.enabled=true", "--set", "logging.wandb=disabled"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "32" in line]
    assert len(warned) == 2 and all(line.startswith("warning: ") for line in warned), done.stderr
    assert "train.resolution 33" in warned[0] and "differ modulo 32" in warned[1]
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr


def test_unknown_first_trainable_lists_valid_names():
    from train.run_plan import plan_run

    with pytest.raises(ConfigError) as err:
        plan_run(load_config(None, ["finetune.enabled=true", "finetune.first_trainable=blocks.9.0"]))
    assert "finetune.first_trainable: 'blocks.9.0' is not a split point" in str(err.value)
    assert "blocks.5.3" in str(err.value) and "head" in str(err.value)
    with pytest.raises(ValueError, match="'blocks.9.0' is not a split point"):
        freeze_before(build_model(ModelConfig()), "blocks.9.0")


def test_finetune_phase_defaults_follow_the_paper():
    cfg = load_config(None, ["model.name=efficientnet-b0", "train.resolution=half", "finetune.enabled=true",
                             "train.mixup_alpha=0.1", "train.cutmix_lambda=0.9"])
    train, tune = run_phases(cfg)
    assert (train.resolution, tune.resolution) == (160, 224)
    assert tune.optimizer.name == "sgd" and tune.optimizer.momentum == 0 and tune.optimizer.lr == 0.25
    assert tune.optimizer.reference_batch == 512 and tune.schedule.name == "cosine"
    assert tune.schedule.warmup_epochs == 0 and tune.epochs == 2 and tune.preprocessing == "eval"
    assert tune.stages[0].mixup_alpha == 0 and tune.cutmix_lambda is None  # mixing off
    assert train.stages[0].mixup_alpha == 0.1 and train.cutmix_lambda == 0.9


@needs_fashion
def test_finetune_batches_use_eval_preprocessing_without_randomness():
    cfg = load_config(None, TINY + ["finetune.enabled=true", "finetune.resolution=64"])
    tune = finetune_phase(cfg)
    dataset = build_dataset(cfg.data, "train", build_transform(tune.preprocessing, tune.resolution, cfg.data))
    for index in (0, 17, 401):
        first, _ = dataset[SampleKey(index, seed=3, epoch=0)]
        second, _ = dataset[SampleKey(index, seed=3, epoch=1)]
        assert first.shape == (3, 64, 64) and torch.equal(first, second)
    augmented = build_dataset(cfg.data, "train", build_transform("train", 64, cfg.data))
    assert not torch.equal(augmented[SampleKey(0, 3, 0)][0], augmented[SampleKey(0, 3, 1)][0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One low-resolution (32 px) training run on real Fashion-MNIST, shared by the tests below."""
    if not FASHION_MNIST.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("lowres")
    assert train_main(sets(TINY + ["train.resolution=32", "train.epochs=2", f"logging.run_dir={root / 'runs'}"])) == 0
    (run_dir,) = (root / "runs").iterdir()
    return root, run_dir / "checkpoints" / "train-final.pt"


@pytest.mark.slow
def test_freezing_keeps_earlier_layers_bit_identical(trained):
    root, checkpoint = trained
    start = load_checkpoint(checkpoint)["averages"]["epoch"]
    args = ["--checkpoint", str(checkpoint)] + sets([
        "finetune.resolution=64", "finetune.first_trainable=blocks.5.0", "finetune.max_steps=3",
        f"logging.run_dir={root / 'freeze'}"])
    assert finetune_main(args) == 0
    (run_dir,) = (root / "freeze").iterdir()
    after = load_checkpoint(run_dir / "checkpoints" / "finetune-final.pt")["model"]
    frozen = [k for k in start if k.startswith(("stem.", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.",
                                                 "blocks.4."))]
    trainable = [k for k in start if k.startswith(("blocks.5.", "blocks.6.", "head.", "classifier."))]
    assert frozen and trainable
    for key in frozen:
        assert torch.equal(start[key], after[key]), key
    assert all(not torch.equal(start[k], after[k]) for k in trainable if k.endswith("weight"))


def test_no_gradient_reaches_frozen_parameters():
    cfg = load_config(None, TINY)
    model = build_model(cfg.model)
    frozen = freeze_before(model, "head")
    from train.task import ClassificationTask

    task = ClassificationTask(model, 10, frozen=frozen).train()
    assert not any(m.training for m in frozen) and model.head.training
    loss, _, _ = task(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        before_head = not name.startswith(("head.", "classifier."))
        assert (p.grad is None) == before_head, name


@pytest.mark.slow
def test_finetune_at_native_resolution_beats_no_finetune_and_sweep_plots(trained, capsys):
    root, checkpoint = trained
    args = ["--checkpoint", str(checkpoint)] + sets([
        "finetune.resolution=64", "finetune.epochs=1", "finetune.first_trainable=blocks.5.0",
        f"logging.run_dir={root / 'tune'}"])
    assert finetune_main(args) == 0
    (run_dir,) = (root / "tune").iterdir()
    tuned = run_dir / "checkpoints" / "finetune-final.pt"
    capsys.readouterr()
    plot = root / "sweep.png"
    assert validate_main(["--checkpoint", str(checkpoint), "--checkpoint", str(tuned), "--resolutions", "32,48,64",
                          "--plot", str(plot), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{\"checkpoint")]
    assert len(rows) == 6
    (plotted,) = [json.loads(line) for line in out if line.startswith("{\"plot")]
    kinds = [checkpoint_weights(load_checkpoint(p), None, p)[0] for p in (checkpoint, tuned)]  # what validate took
    assert plotted["curves"] == [f"train: {checkpoint.name} ({kinds[0]} weights)",
                                 f"finetune: {tuned.name} ({kinds[1]} weights)"]
    at = {(r["phase"], r["resolution"]): r["top1"] for r in rows}
    assert at[("finetune", 64)] >= at[("train", 64)]
    assert at[("train", 32)] > 0.3  # it learned at its training resolution (chance: 0.1 +- 0.013 on 500 images)
    assert plot.stat().st_size > 5000 and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_resume_inside_the_finetune_phase(trained):
    root, checkpoint = trained
    common = ["finetune.resolution=48", "finetune.epochs=2", "finetune.first_trainable=blocks.4.0",
              "checkpoint.every_steps=20", "checkpoint.keep=10"]
    assert finetune_main(["--checkpoint", str(checkpoint)] + sets(common + [f"logging.run_dir={root / 'ra'}"])) == 0
    (first,) = (root / "ra").iterdir()
    middle = first / "checkpoints" / "finetune-step00000080.pt"  # 64 steps per epoch: mid-epoch 2
    state = load_checkpoint(middle)
    assert state["position"]["epoch"] == 1 and state["phases"] == ["finetune"]
    copy = root / "rb" / "resumed" / "checkpoints"
    copy.mkdir(parents=True)
    (copy / middle.name).write_bytes(middle.read_bytes())
    assert train_main(["--resume", str(copy / middle.name)]) == 0
    a = load_checkpoint(first / "checkpoints" / "finetune-final.pt")["model"]
    b = load_checkpoint(copy / "finetune-final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_progressive_stages_ramp_resolution_and_regularisation():
    cfg = load_config(None, ["model.name=efficientnet-b0", "train.epochs=8", "train.resolution=224",
                             "train.progressive={stages: 4, start_resolution: 128, mixup_alpha: [0, 0.3],"
                             " dropout: [0.1, 0.4]}"])
    stages = training_phase(cfg).stages
    assert [s.first_epoch for s in stages] == [0, 2, 4, 6]
    assert [s.resolution for s in stages] == [128, 160, 192, 224]
    assert [round(s.mixup_alpha, 3) for s in stages] == [0.0, 0.1, 0.2, 0.3]
    assert [round(s.dropout, 3) for s in stages] == [0.1, 0.2, 0.3, 0.4]
    ramped = load_config(None, ["train.epochs=4", "train.progressive={stages: 2, randaugment: [5, 15]}"])
    assert [s.randaugment for s in training_phase(ramped).stages] == [5, 15]
    with pytest.raises(ConfigError, match="need at least as many epochs"):
        training_phase(load_config(None, ["train.epochs=2", "train.progressive={stages: 4}"]))


@pytest.mark.slow
@needs_fashion
def test_progressive_run_changes_resolution_and_reports_cost(tmp_path, capsys):
    args = sets(TINY + ["data.train_subset=256", "data.val_subset=100", "train.epochs=2", "train.resolution=32",
                        "train.progressive={stages: 2, start_resolution: 16, dropout: [0.0, 0.3]}",
                        "logging.log_every=1", f"logging.run_dir={tmp_path}"])
    assert train_main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_epoch = {(line["epoch"], line["resolution"]) for line in lines if "train/loss" in line}
    assert by_epoch == {(0, 16), (1, 32)}
    cost = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{\"cost")][0]
    macs = build_model(load_config(None, TINY).model)
    from models.measure import count_macs

    expected = 256 * count_macs(macs, 16) + 256 * count_macs(macs, 32)
    assert cost["images"] == 512 and cost["forward_macs"] == expected and cost["seconds"] > 0


def test_presets_train_at_their_own_training_resolution():
    """V2 trains smaller than it is evaluated (V2-S: 300 for 384); V1 trains at its evaluation size."""
    assert training_phase(load_config(None, ["model.name=efficientnetv2-s"])).resolution == 300
    assert training_phase(load_config(None, ["model.name=efficientnetv2-b0"])).resolution == 192
    assert training_phase(load_config(None, ["model.name=efficientnet-b3"])).resolution == 300
    assert finetune_phase(load_config(None, ["model.name=efficientnetv2-s"])).resolution == 384


def test_phase_overrides_follow_one_rule():
    """A key set in a phase's section replaces the main section's; a null one keeps it (finetune.optimizer,
    finetune.schedule and ipu.finetune alike)."""
    cfg = load_config(None, ["finetune.enabled=true", "optimizer.eps=0.01", "optimizer.clip_grad_norm=2.0",
                             "finetune.optimizer={name: adamw, lr: 0.1, weight_decay: null}",
                             "finetune.schedule.warmup_epochs=0.5", "optimizer.weight_decay=0.03"])
    tune = finetune_phase(cfg).optimizer
    assert (tune.name, tune.lr, tune.reference_batch) == ("adamw", 0.1, 512)  # set here / the phase's default
    assert (tune.eps, tune.clip_grad_norm, tune.weight_decay) == (0.01, 2.0, 0.03)  # kept from optimizer:
    assert finetune_phase(cfg).schedule.warmup_epochs == 0.5
    with pytest.raises(ConfigError, match="optimizer.clip_grad_norm: -1.0"):
        finetune_phase(load_config(None, ["finetune.optimizer.clip_grad_norm=-1"]))
