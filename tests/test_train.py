"""Training engine on real data: learning, exact resume, atomic checkpoints, DDP, and the clear errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, needs_fashion
from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from train.cli import main

ROOT = Path(__file__).resolve().parents[1]
# A tiny G16-LN+PN network on a Fashion-MNIST subset: seconds per run on two CPU cores.
TINY = TINY_MODEL + [
    "data.dataset=fashion-mnist", "data.workers=0", "data.crop_scale=[0.5,1.0]", "data.train_subset=512",
    "data.val_subset=256", "train.resolution=32", "train.micro_batch_size=32", "train.val_batch_size=128",
    "train.epochs=1", "optimizer.lr=0.05", "optimizer.reference_batch=256", "schedule.name=cosine",
    "schedule.warmup_epochs=0.1", "logging.wandb=disabled", "logging.log_every=4",
]


def run(tmp_path: Path, *extra: str, resume: str = None) -> int:
    args = ["--set", f"logging.run_dir={tmp_path / 'runs'}"]
    for item in TINY + list(extra):
        args += ["--set", item]
    if resume:
        args += ["--resume", resume]
    return main(args)


def run_dirs(tmp_path: Path):
    return sorted((tmp_path / "runs").iterdir())


def final_state(run_dir: Path, phase: str = "train"):
    return load_checkpoint(run_dir / "checkpoints" / f"{phase}-final.pt")


def summary(run_dir: Path):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("kind") == "summary"][-1]


@pytest.mark.slow
@needs_fashion
def test_short_fashion_mnist_run_learns(tmp_path):
    assert run(tmp_path, "data.train_subset=4096", "data.val_subset=1000", "train.epochs=2") == 0
    (run_dir,) = run_dirs(tmp_path)
    result = summary(run_dir)
    assert result["train/val/top1@32"] > 0.6  # chance is 0.1
    assert (run_dir / "config.yaml").is_file()
    assert result["train/steps"] == 2 * 4096 // 32


@pytest.mark.slow
@needs_fashion
def test_resume_from_a_mid_run_checkpoint_gives_identical_weights(tmp_path):
    extra = ["train.epochs=2", "checkpoint.every_steps=5", "checkpoint.keep=100", "train.mixup_alpha=0.2",
             "train.cutmix_lambda=0.9", "model.dropout=0.2", "train.ema_decay=0.9"]
    assert run(tmp_path / "a", *extra) == 0
    (first,) = run_dirs(tmp_path / "a")
    middle = first / "checkpoints" / "train-step00000020.pt"  # mid-epoch 2 of 2 (16 steps per epoch)
    assert load_checkpoint(middle)["position"]["call"] == 4
    # Resume into a copy of the checkpoint so the first run's files stay untouched.
    copy = tmp_path / "b" / "runs" / "resumed" / "checkpoints"
    copy.mkdir(parents=True)
    (copy / middle.name).write_bytes(middle.read_bytes())
    assert main(["--resume", str(copy / middle.name)]) == 0
    a, b = final_state(first), final_state(copy.parent)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["averages"]["ema"]:
        assert torch.equal(a["averages"]["ema"][key], b["averages"]["ema"][key]), key


@needs_fashion
@pytest.mark.slow
def test_compiled_training_matches_eager_and_keeps_the_checkpoint_keys(tmp_path):
    """train.compile with compile_mode reduce-overhead (CUDA graphs on a GPU, plain Inductor on a CPU)."""
    extra = ["data.train_subset=96", "data.val_subset=64", "model.dropout=0", "model.survival_prob=1"]
    assert run(tmp_path / "eager", *extra) == 0
    assert run(tmp_path / "compiled", *extra, "train.compile=true", "train.compile_mode=reduce-overhead") == 0
    (eager,), (compiled,) = run_dirs(tmp_path / "eager"), run_dirs(tmp_path / "compiled")
    a, b = final_state(eager)["model"], final_state(compiled)["model"]
    assert a.keys() == b.keys()  # no "_orig_mod." prefix: checkpoints move between the two
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    assert summary(compiled)["train/steps"] == summary(eager)["train/steps"] == 3


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = {"model": {"w": torch.ones(3)}, "config": {}}
    save_checkpoint(good, path)

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")  # some bytes reach the temp file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_corrupt_checkpoint_is_named_and_auto_resume_falls_back(tmp_path, capsys):
    from train.checkpoint import find_resumable

    ckpts = tmp_path / "run-1" / "checkpoints"
    save_checkpoint({"model": {}, "config": {}}, ckpts / "train-step00000001.pt")
    time.sleep(0.01)
    bad = ckpts / "train-step00000002.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    warnings = []
    assert find_resumable([tmp_path / "run-1"], warn=warnings.append).name == "train-step00000001.pt"
    assert str(bad) in warnings[0]


def test_missing_data_path_and_bad_values_give_clear_errors(tmp_path, capsys):
    assert main(["--set", "data.dataset=imagefolder", "--set", f"data.path={tmp_path / 'nowhere'}",
                 "--set", "logging.wandb=disabled", "--set", f"logging.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "Traceback" not in err
    assert main(["--set", "train.micro_batch_size=0"]) == 2
    assert "train.micro_batch_size: 0 is below the minimum 1" in capsys.readouterr().err
    assert main(["--set", "optimizer.name=adam"]) == 2
    assert "'rmsprop_tf', 'sgd', 'adamw'" in capsys.readouterr().err


@pytest.mark.slow
def test_corrupt_image_is_named(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "set" / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(d / f"{i}.jpg")
    bad = tmp_path / "set" / "train" / "a" / "0.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    args = ["--set", "data.dataset=imagefolder", "--set", f"data.path={tmp_path / 'set'}", "--set", "data.workers=0",
            "--set", "model.num_classes=2", "--set", "model.width_mult=0.25", "--set", "model.depth_mult=0.25",
            "--set", "train.micro_batch_size=8", "--set", "train.resolution=32", "--set", "train.epochs=1",
            "--set", "logging.wandb=disabled", "--set", f"logging.run_dir={tmp_path / 'runs'}"]
    assert main(args) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(args + ["--set", "data.skip_corrupt=true"]) == 0


@pytest.mark.slow
def test_cifar10_jpeg_tarball_run(tmp_path, shared_cifar_tarball, monkeypatch):
    monkeypatch.setenv("EFFNET_CACHE_DIR", str(tmp_path / "cache"))
    code = run(tmp_path, "data.dataset=tar", f"data.path={shared_cifar_tarball}", "data.train_subset=2560",
               "data.val_subset=500", "data.crop_scale=[0.35,1.0]", "train.epochs=2", "optimizer.name=adamw",
               "optimizer.lr=0.002", "optimizer.reference_batch=32", "optimizer.eps=1e-8")
    assert code == 0
    (run_dir,) = run_dirs(tmp_path)
    # 10 classes: chance is 0.10 +- 0.013 on 500 images; 160 steps of a tiny net on real JPEGs get about 0.2.
    assert summary(run_dir)["train/val/top1@32"] > 0.17


@pytest.mark.slow
@needs_fashion
def test_ddp_two_gloo_processes_equal_one_process_with_accumulation_two(tmp_path):
    common = TINY + ["model.dropout=0.0", "model.survival_prob=1.0", "train.epochs=1", "data.train_subset=256"]

    def launch(run_dir: Path, nproc: int, accumulation: int):
        settings = common + [f"logging.run_dir={run_dir}", f"train.gradient_accumulation={accumulation}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train"] + [a for s in settings for a in ("--set", s)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        (d,) = run_dir.iterdir()
        return final_state(d)

    two = launch(tmp_path / "ddp", 2, 1)
    one = launch(tmp_path / "single", 1, 2)
    assert two["position"]["step"] == one["position"]["step"] == 256 // 64
    for key, value in one["model"].items():
        assert torch.allclose(value, two["model"][key], rtol=1e-4, atol=1e-5), key
