"""What a run checks before its first step, the one-line errors of every path, and an honest resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import List

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL, needs_fashion
from data.layout import infer_dataset
from models import build_model, load_exported
from models.exported_file import EvalPreprocessing, save_exported
from train import cli as train_cli
from train.checkpoint import candidates, load_checkpoint, save_checkpoint
from train.config import ConfigError, config_to_dict, load_config
from train.export import load_trained
from train.resume import check_resume

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUICK = TINY_MODEL + ["train.resolution=16", "train.micro_batch_size=8", "train.val_batch_size=8",
                      "train.epochs=2", "logging.wandb=disabled", "optimizer.name=adamw", "optimizer.lr=0.002",
                      "optimizer.reference_batch=8", "schedule.warmup_epochs=0"]


def sets(items: List[str]) -> List[str]:
    return [a for item in items for a in ("--set", item)]


def train(*args: str, module: str = "train") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


def one_error_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process exited with ``code`` and printed exactly one ``error:`` line and no traceback; that line."""
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    return line


def image_folder(root: Path, per_class: int = 12, size: int = 24) -> Path:
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (20 * i, 100 * c, 7 * i)).save(folder / f"{i:02d}.jpg")
    return root


def folder_run(data: Path, runs: Path, *extra: str) -> List[str]:
    return sets(QUICK + ["model.num_classes=2", "data.dataset=imagefolder", f"data.path={data}",
                         f"logging.run_dir={runs}", *extra])


# ------------------------------------------------------------------------------------------- found before any step
@pytest.mark.slow
def test_a_corrupt_image_in_a_loader_worker_is_one_line(tmp_path):
    data = image_folder(tmp_path / "set")
    bad = data / "train" / "b" / "07.jpg"  # not in the first batch: found by a worker during training
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    line = one_error_line(train(*folder_run(data, tmp_path / "runs", "data.workers=2")))
    assert f"corrupt image {bad}" in line and "in DataLoader worker process" in line


@pytest.mark.slow
def test_a_corrupt_first_batch_stops_before_the_run_starts(tmp_path):
    data = image_folder(tmp_path / "set")
    bad = data / "val" / "a" / "00.jpg"
    bad.write_bytes(b"garbage")
    line = one_error_line(train(*folder_run(data, tmp_path / "runs", "data.workers=0")))
    assert str(bad) in line
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.slow
def test_a_corrupt_image_late_in_validation_keeps_the_epoch(tmp_path):
    """The checkpoint written before validating holds the epoch; a resume validates, then trains on."""
    data = image_folder(tmp_path / "set")
    bad = data / "val" / "b" / "05.jpg"  # beyond the first validation batch of 8
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"garbage")
    args = folder_run(data, tmp_path / "runs", "data.workers=0")
    line = one_error_line(train(*args))
    assert str(bad) in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run_dir / "checkpoints" / "train-step00000003.pt")  # 24 images / 8 = 3 steps
    assert saved["position"]["epoch"] == 1 and saved["position"]["pending_validation"]
    bad.write_bytes(good_bytes)
    assert train(*args, "--resume", "auto").returncode == 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if "val/top1@16" in x] == [1, 2]


@pytest.mark.slow
def test_a_bad_first_trainable_fails_before_training(tmp_path):
    done = train(*sets(QUICK + ["finetune.enabled=true", "finetune.first_trainable=blocks.99.0",
                                f"logging.run_dir={tmp_path}"]))
    line = one_error_line(done)
    assert "finetune.first_trainable: 'blocks.99.0'" in line and "blocks.1.0" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_fashion
def test_a_batch_larger_than_the_data_set_is_an_error_not_zero_steps(tmp_path):
    line = one_error_line(train(*sets(QUICK + ["data.train_subset=16", "train.micro_batch_size=32",
                                               f"logging.run_dir={tmp_path}"])))
    assert "train.micro_batch_size 32" in line and "16" in line and "no step" in line


@pytest.mark.slow
def test_yaml_syntax_errors_are_one_line_with_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yml"
    recipe.write_text("model:\n  norm: layer\n  group_dim: [16\n")
    line = one_error_line(train("--config", str(recipe), "--print-config"))
    assert f"{recipe}:4:1: not valid YAML" in line


@pytest.mark.slow
def test_print_config_shows_what_the_recipe_resolves_to():
    done = train("--config", "configs/models/efficientnet-b0-g16-ln-pn.yml", "--print-config",
                 "--set", "train.resolution=half")
    assert done.returncode == 0, done.stderr
    assert "#   phase train: 160 px" in done.stdout
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("#   JPEG decoder: ")]
    decoder, resize = line.removeprefix("#   JPEG decoder: ").split(", resize: ")
    assert decoder in ("region", "simplejpeg", "pillow")
    assert resize in ("C, SSE4.1", "C, scalar") or resize.startswith("Pillow ("), resize


# --------------------------------------------------------------------------------------------------- resume
@pytest.fixture
def finished_run(tmp_path):
    """A tiny image-folder run of 6 steps with a checkpoint every 2, and its arguments."""
    data = image_folder(tmp_path / "set")
    args = folder_run(data, tmp_path / "runs", "data.workers=0", "checkpoint.every_steps=2", "checkpoint.keep=10")
    done = train(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return args, next((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_resume_refuses_a_different_batch_geometry_unless_forced(finished_run):
    args, run_dir = finished_run
    middle = run_dir / "checkpoints" / "train-step00000004.pt"
    line = one_error_line(train(*args, "--set", "train.micro_batch_size=4", "--resume", str(middle)))
    assert "train.micro_batch_size: 8 -> 4" in line and "--resume-force" in line
    forced = train(*args, "--set", "train.micro_batch_size=4", "--resume", str(middle), "--resume-force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "--resume-force: continuing" in forced.stderr and "train.micro_batch_size: 8 -> 4" in forced.stderr


@pytest.mark.slow
def test_resume_into_another_model_is_one_line_even_when_forced(finished_run):
    args, run_dir = finished_run
    assert "model.width_mult" in one_error_line(train(*args, "--set", "model.width_mult=0.5", "--resume", "auto"))
    line = one_error_line(train(*args, "--set", "model.width_mult=0.5", "--resume", "auto", "--resume-force"))
    assert "does not fit this model" in line and "differ in shape" in line


@pytest.mark.slow
def test_validate_with_another_class_count_is_one_line(finished_run):
    args, run_dir = finished_run
    line = one_error_line(train("--checkpoint", str(run_dir / "checkpoints" / "train-final.pt"), "--resolutions",
                                "16", "--device", "cpu", "--set", "model.num_classes=5", module="train.validate"))
    assert "classifier.weight" in line and "[2, " in line and "[5, " in line


@pytest.mark.slow
def test_resume_refuses_to_drop_the_wandb_run(tmp_path):
    data = image_folder(tmp_path / "set")
    args = folder_run(data, tmp_path / "runs", "data.workers=0", "train.epochs=1", "logging.wandb=offline")
    assert train(*args).returncode == 0
    line = one_error_line(train(*args, "--set", "logging.wandb=disabled", "--resume", "auto"))
    assert "logging.wandb" in line and "W&B run id" in line


@pytest.mark.parametrize("old, impl", [({"fused_norm": "on", "norm_autograd": "auto"}, "triton"),
                                       ({"fused_norm": "off", "norm_autograd": "modules"}, "modules"),
                                       ({"fused_norm": "auto", "norm_autograd": "function"}, "function"),
                                       ({"fused_norm": "auto", "norm_autograd": "auto"}, "auto")])
def test_a_checkpoint_or_export_with_the_old_norm_keys_loads_resumes_and_exports(tmp_path, old, impl):
    """Before ``model.norm_impl``, checkpoints and exported files stored ``model.fused_norm`` and
    ``model.norm_autograd``: reading one maps them to ``norm_impl``, so its config loads, a resume sees no change
    that matters, and it exports (as auto in place of the training-time Triton kernels) and reloads."""
    cfg = load_config(None, TINY_MODEL)
    stored = config_to_dict(cfg)
    stored["model"] = {**{k: v for k, v in stored["model"].items() if k != "norm_impl"}, **old}
    weights = build_model(cfg.model).state_dict()
    path = save_checkpoint({"model": weights, "config": stored}, tmp_path / "old.pt")
    state = load_checkpoint(path)
    assert state["config"]["model"] == {**config_to_dict(cfg)["model"], "norm_impl": impl}
    assert load_config(None, [], base=state["config"]).model.norm_impl == impl
    notes: List[str] = []
    check_resume(state, cfg, 1, False, notes.append)  # norm_impl may change on a resume; nothing else changed
    trained = load_trained(path, [])
    assert trained.cfg.model.norm_impl == ("auto" if impl == "triton" else impl) and not notes
    assert all(torch.equal(v, weights[k]) for k, v in trained.network.state_dict().items())
    exported = save_exported(tmp_path / "new.safetensors", trained.cfg.model, weights, [str(i) for i in range(10)],
                             EvalPreprocessing(32, 0.875, "bilinear", (0.0,) * 3, (1.0,) * 3), {})
    with safe_open(str(exported), framework="pt") as f:
        meta = f.metadata()
    meta["model"] = json.dumps({**stored["model"], "fused_norm": "auto"})  # as an earlier export wrote it
    save_file(load_file(str(exported)), str(tmp_path / "old.safetensors"), metadata=meta)
    assert load_exported(tmp_path / "old.safetensors", form="training").config.norm_impl == old["norm_autograd"]


def test_resume_auto_orders_by_phase_and_step_not_modification_time(tmp_path):
    """``cp -r`` gives every file a new mtime; the furthest checkpoint still wins."""
    run = tmp_path / "run-20260101-000000" / "checkpoints"
    for name in ("train-step00000030.pt", "train-step00000035.pt", "train-final.pt", "finetune-step00000005.pt"):
        save_checkpoint({"model": {}, "config": {}}, run / name)
    copied = tmp_path / "run-20260101-000000-copy"
    shutil.copytree(tmp_path / "run-20260101-000000", copied)
    os.utime(copied / "checkpoints" / "train-step00000030.pt", (4e9, 4e9))  # the newest file by far
    order = [p.name for p in candidates([copied])]
    assert order == ["finetune-step00000005.pt", "train-final.pt", "train-step00000035.pt", "train-step00000030.pt"]


# ------------------------------------------------------------------------------- the first hour: shortcuts, --check
def test_the_data_kind_is_read_from_the_path(tmp_path):
    folder = image_folder(tmp_path / "folder", per_class=1)
    tarball = tmp_path / "set.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder / "train", arcname="train")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text("{}")
    (tmp_path / "fmnist").mkdir()
    (tmp_path / "fmnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert [infer_dataset(str(p)) for p in (folder, tarball, tmp_path / "shards", tmp_path / "fmnist")] == [
        "imagefolder", "tar", "shards", "fashion-mnist"]
    assert infer_dataset(None) == "fashion-mnist" and infer_dataset(str(tmp_path / "shards" / "index.json")) is None
    assert load_config(None, [f"data.path={tarball}"]).data.dataset == "tar"  # the run records the kind it read
    assert load_config(None, ["data.dataset=imagefolder", f"data.path={tarball}"]).data.dataset == "imagefolder"
    with pytest.raises(ConfigError, match=r"data.dataset auto: data.path .*empty holds no data set it knows"):
        (tmp_path / "empty").mkdir()
        load_config(None, [f"data.path={tmp_path / 'empty'}"])


@pytest.mark.slow
def test_shortcuts_and_check_run_every_check_and_start_nothing(tmp_path):
    data, runs = image_folder(tmp_path / "data"), tmp_path / "runs"
    quick = sets(TINY_MODEL + ["model.num_classes=2", "logging.wandb=disabled", "train.val_batch_size=8"])
    done = train("--data", str(data), "--epochs", "3", "--batch-size", "8", "--resolution", "16", "--workers", "0",
                 "--lr", "0.01", "--output", str(runs), "--amp", "--check", *quick)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "phase train: 16 px, 3 epochs, 8 samples per step" in done.stdout
    assert "check passed: training ImageFolderDataset" in done.stdout and not runs.exists()  # nothing started
    resolved = train("--data", str(data), "--epochs", "3", "--lr", "0.01", "--amp", "--print-config", *quick)
    assert "dataset: imagefolder" in resolved.stdout and "lr: 0.01" in resolved.stdout
    assert "compute: bf16" in resolved.stdout  # --amp on a CPU (the suite runs without a GPU)
    # --check finds what a run would find before its first step: here an undecodable first training image.
    (data / "train" / "a" / "00.jpg").write_bytes(b"not a jpeg")
    assert "00.jpg" in one_error_line(train("--data", str(data), "--check", "--workers", "0", "--batch-size", "8",
                                            "--resolution", "16", *quick))
    assert "--epochs and --set train.epochs" in one_error_line(
        train("--data", str(data), "--epochs", "2", "--check", *quick, "--set", "train.epochs=3"))
    assert "data.path" in one_error_line(train("--data", str(tmp_path / "nowhere"), "--check", *quick))


@pytest.mark.slow
def test_the_console_names_the_run_folder_first_and_prints_a_line_per_validation(tmp_path):
    data, runs = image_folder(tmp_path / "data"), tmp_path / "runs"
    done = train(*folder_run(data, runs, "train.validate_every=1", "train.val_resolutions=[16,24]"))
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    # Warnings about the recipe (16 px is off the stride-32 grid) come first, then the run.
    assert [line for line in lines if not line.startswith("warning: ")][0] == f"run folder: {run_dir}"
    epochs = [line for line in lines if line.startswith("train epoch ") and "s training:" in line]
    assert [line.split(",")[0] for line in epochs] == ["train epoch 1/2", "train epoch 2/2"]
    assert all("top-1" in line and "@16" in line and "@24" in line for line in epochs)
    finals = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"phase"')]
    shown = f"{100 * finals[0]['val/top1@24']:.2f} %"  # the last line agrees with the final results
    assert shown in epochs[-1].split("@16")[1], (shown, epochs[-1])
    assert any("train epoch 2/2" in line and "3/3" in line for line in lines), "the bar ends at its total"


def test_resume_auto_takes_the_furthest_run_not_the_newest(tmp_path):
    """A new run of the same config started by mistake and stopped at step 1 must not hide the one at step 21."""
    older, newer = tmp_path / "run-20260101-000000", tmp_path / "run-20260102-000000"
    save_checkpoint({"model": {}, "config": {}}, older / "checkpoints" / "train-step00000021.pt")
    save_checkpoint({"model": {}, "config": {}}, newer / "checkpoints" / "train-step00000001.pt")
    assert candidates([newer, older])[0] == older / "checkpoints" / "train-step00000021.pt"
    save_checkpoint({"model": {}, "config": {}}, newer / "checkpoints" / "train-step00000021.pt")
    assert candidates([older, newer])[0] == newer / "checkpoints" / "train-step00000021.pt"  # equals: the newer


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run):
    args, run_dir = finished_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    done = train(*args, "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{run_dir} is finished (train-final.pt); nothing to resume" in done.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_class_count_that_does_not_fit_the_data_is_found_before_the_first_step(tmp_path):
    data = image_folder(tmp_path / "data", per_class=2)  # 2 classes
    quick = sets(TINY_MODEL + ["logging.wandb=disabled", "train.val_batch_size=4"])
    fewer = one_error_line(train("--data", str(data), "--batch-size", "4", "--resolution", "16", "--check", *quick,
                                 "--set", "model.num_classes=1"))
    assert "model.num_classes 1 is fewer than the 2 classes of" in fewer and "model.num_classes=2" in fewer
    more = train("--data", str(data), "--batch-size", "4", "--resolution", "16", "--check", *quick)  # 10 outputs
    assert more.returncode == 0, more.stderr[-3000:]
    (warned,) = [line for line in more.stderr.splitlines() if "model.num_classes" in line]
    assert warned.startswith("warning: model.num_classes 10 but") and "8 outputs will never be a label" in warned


def test_shortcuts_are_set_items_and_data_reads_its_kind_unless_given():
    parse = train_cli.build_parser().parse_args
    assert train_cli.shortcut_overrides(parse(["--data", "/d", "--epochs", "3", "--resolution", "half"])) == [
        'data.path="/d"', "train.epochs=3", 'train.resolution="half"', "data.dataset=auto"]
    explicit = train_cli.shortcut_overrides(parse(["--data", "/d", "--set", "data.dataset=imagefolder"]))
    assert explicit == ['data.path="/d"', "data.dataset=imagefolder"]  # the kind given wins over auto
    with pytest.raises(ConfigError, match="--batch-size and --set train.micro_batch_size both set"):
        train_cli.shortcut_overrides(parse(["--batch-size", "8", "--set", "train.micro_batch_size=4"]))
