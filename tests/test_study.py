"""``python -m bench.study`` end to end on real processes and real photos (Imagenette2 from ../shared).

One micro study of three runs — two identical tiny arms and one whose data path does not exist — run the way a
user runs it: a failing arm is reported while the others finish, a signal stops the study with a checkpoint, the
next invocation skips what finished, resumes what was stopped (to the weights of an uninterrupted run) and retries
what failed, and the results and plots are written from the records.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bench.study import headline, load_study, pareto, train_command
from train.checkpoint import load_checkpoint
from train.config import ConfigError
from train.trainer import run_dirs_named

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
#: 2 epochs of 6 steps at 32 px on 192 photos; a checkpoint every 2 steps so a stop lands mid-run.
EPOCHS, PHOTOS = 2, 192
SHARED_SET = {
    "model.num_classes": 10, "model.width_mult": 0.25, "model.depth_mult": 0.25, "data.dataset": "tar",
    "data.workers": 0, "data.train_subset": PHOTOS, "data.val_subset": 64, "train.resolution": 32,
    "train.epochs": EPOCHS, "train.micro_batch_size": 32, "train.val_batch_size": 64, "train.val_resolutions": [32, 64],
    "optimizer.name": "adamw", "optimizer.lr": 0.002, "optimizer.reference_batch": 32, "schedule.name": "cosine",
    "schedule.warmup_epochs": 0, "logging.wandb": "disabled", "checkpoint.every_steps": 2,
}


def write_study(path: Path, data: Path) -> Path:
    study = {
        "config": str(ROOT / "configs/models/efficientnet-b0-g16-ln-pn.yml"),
        "test_resolution": 64,
        "sweep_resolutions": [32, 64],
        "set": {**SHARED_SET, "data.path": str(data)},
        "arms": [{"name": "a"}, {"name": "b"}, {"name": "broken", "set": {"data.path": str(path.parent / "none")}},
                 {"name": "ft", "finetune_from": "a",
                  "set": {"finetune.enabled": True, "finetune.resolution": 64, "finetune.epochs": 1}}],
    }
    path.write_text(yaml.safe_dump(study))
    return path


def study_cmd(study: Path, out: Path, *extra: str) -> list:
    return [sys.executable, "-m", "bench.study", str(study), "--out", str(out), *extra]


def final_weights(out: Path, run: str) -> dict:
    (run_dir,) = (out / "runs").glob(f"{run}-*")
    return load_checkpoint(run_dir / "checkpoints" / "train-final.pt")["model"]


@pytest.mark.slow
def test_a_micro_study_runs_skips_resumes_and_reports_failures(shared_imagenette_tarball, tmp_path):
    study, out = write_study(tmp_path / "micro.yml", shared_imagenette_tarball), tmp_path / "study"
    env = {**ENV, "EFFNET_CACHE_DIR": str(tmp_path / "cache")}

    # 1. Arm a and the broken arm: the failure is one line at the end, exit 1, and a still finishes.
    done = subprocess.run(study_cmd(study, out, "--arms", "a,broken"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "a: ok (exit 0)" in done.stdout and "broken: failed (exit 2)" in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("error: 1 run(s) failed: broken (exit 2, log ")
    assert "does not exist" in (out / "logs" / "broken.log").read_text()  # the trainer's own one-line error
    rows = {r["run"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["a"]["status"] == "ok" and rows["broken"]["status"] == "failed"
    rate = float(rows["a"]["train_images_per_s_median"])  # the median of the run's logged window rates
    # Both figures are rounded to 0.1 (s and images/s): 0.05 s, plus the images / rate's change for 0.05 images/s.
    steady = EPOCHS * PHOTOS / rate
    assert float(rows["a"]["training_seconds_steady"]) == pytest.approx(steady, abs=0.05 + steady * 0.05 / rate)
    record = json.loads((out / "arms" / "a.json").read_text())
    assert record["images_seen"] == EPOCHS * PHOTOS and record["train_resolution"] == 32 and 0 <= record["top1"] <= 1
    assert record["training_gmacs"] > 0 and record["train_images_per_s"] > 0 and record["peak_rss_mib"] > 0
    assert {(s["phase"], s["resolution"]) for s in record["sweep"]} == {("train", 32), ("train", 64)}
    assert record["top1"] == record["val"]["train/epoch_avg/top1@64"]  # the weights it hands on, at 64 px
    at_64 = [s["top1"] for s in record["sweep"] if s["resolution"] == 64]
    assert at_64 == [record["top1"]]  # the sweep and the run's own validation agree
    assert (out / "figure1.png").stat().st_size > 0 and (out / "fixres.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert f"| a | G16-LN+PN | 32 | 32 | {EPOCHS} | {100 * record['top1']:.2f} |" in table and "| broken |" in table

    # 2. Arm b, stopped by SIGTERM to the study's process group once it has a step checkpoint: exit 130, no record.
    proc = subprocess.Popen(study_cmd(study, out, "--arms", "b"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600  # a guard against a hang only: a loaded 2-core CI machine took over 120 s to start
    try:
        while not list((out / "runs").glob("b-*/checkpoints/train-step*.pt")):
            assert proc.poll() is None, "arm b ended before it was stopped: " + proc.communicate()[1][-3000:]
            assert time.time() < deadline, "arm b never checkpointed"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "study 'micro' interrupted in arm 'b'" in err and not (out / "arms" / "b.json").exists()

    # 3. The whole study again: a skipped, b resumed, broken retried (and still failing), ft fine-tunes a.
    done = subprocess.run(study_cmd(study, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "a: done, skipped" in done.stdout and "b: ok (exit 0)" in done.stdout
    assert "broken: failed (exit 2)" in done.stdout and "ft: ok (exit 0)" in done.stdout
    assert "resuming from" in (out / "logs" / "b.log").read_text()
    a, b = final_weights(out, "a"), final_weights(out, "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed: the same weights, exactly
    assert [r["run"] for r in csv.DictReader(open(out / "results.csv"))] == ["a", "b", "broken", "ft"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    # The fine-tune-only arm counts a's training and its own fine-tune; its sweep is the fine-tuned weights'.
    ft, a_record = (json.loads((out / "arms" / f"{n}.json").read_text()) for n in ("ft", "a"))
    assert ft["finetune_from"] == "a" and ft["finetune_resolution"] == 64 and ft["finetune_images"] == PHOTOS
    assert ft["training_seconds"] == round(a_record["train_seconds"] + ft["finetune_seconds"], 1)
    assert ft["val"]["train/top1@32"] == a_record["val"]["train/top1@32"]
    assert ft["top1"] == ft["val"]["finetune/top1@64"] and {s["phase"] for s in ft["sweep"]} == {"finetune"}


def test_study_file_mistakes_are_one_line_naming_the_arm(tmp_path):
    base = str(ROOT / "configs/models/efficientnet-b0-g16-ln-pn.yml")
    cases = [
        ({"config": base, "arms": [{"name": "x", "set": {"model.nrom": "layer"}}]}, "unknown key 'model.nrom'"),
        ({"config": base, "arms": [{"name": "x", "sets": {}}]}, "arms[0]: unknown key 'sets'"),
        ({"config": base, "arms": [{"name": "x"}, {"name": "x"}]}, "arms[1].name: 'x' is used twice"),
        ({"config": base, "seeds": [], "arms": [{"name": "x"}]}, "seeds: [] is not a non-empty list"),
        ({"config": "missing.yml", "arms": [{"name": "x"}]}, "missing.yml does not exist"),
        ({"config": base, "arms": []}, "a study needs a list of arms"),
    ]
    for index, (study, message) in enumerate(cases):
        path = tmp_path / f"s{index}.yml"
        path.write_text(yaml.safe_dump(study))
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_study(path, tmp_path / "out")


def test_arms_and_seeds_become_runs_with_their_overrides(tmp_path):
    path = tmp_path / "s.yml"
    path.write_text(yaml.safe_dump({
        "config": str(ROOT / "configs/models/efficientnet-b0-g16-ln-pn.yml"), "seeds": [3, 4],
        "set": {"train.resolution": 160}, "arms": [{"name": "n"}, {"name": "h", "seeds": [7],
                                                                   "set": {"train.resolution": 96}}]}))
    study = load_study(path, tmp_path / "out")
    assert [(a.name, a.seed) for a in study.arms] == [("n-s3", 3), ("n-s4", 4), ("h", 7)]
    assert "train.resolution=96" in study.arms[2].overrides  # the arm's value comes after the shared one
    assert study.arms[2].overrides.index("train.resolution=96") > study.arms[2].overrides.index(
        "train.resolution=160")
    assert study.test_resolution == 224  # by default the model's native resolution (B0)


def test_processes_run_under_torchrun_and_a_launcher_goes_first(tmp_path):
    base = {"config": str(ROOT / "configs/models/efficientnet-b0-g16-ln-pn.yml"), "arms": [{"name": "n"}]}
    commands = []
    for extra in ({"processes": 2}, {"launcher": ["poprun", "--num-instances", "2"]}):
        path = tmp_path / f"s{len(commands)}.yml"
        path.write_text(yaml.safe_dump({**base, **extra}))
        study = load_study(path, tmp_path / "out")
        commands.append(train_command(study, study.arms[0]))
    assert commands[0][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert commands[0][6] == "train" and commands[0][-2:] == ["--resume", "auto"]
    assert commands[1][:4] == ["poprun", "--num-instances", "2", sys.executable]
    path = tmp_path / "both.yml"
    path.write_text(yaml.safe_dump({**base, "processes": 2, "launcher": ["poprun"]}))
    with pytest.raises(ConfigError, match="launcher and processes: 2 both launch the runs"):
        load_study(path, tmp_path / "out")


def test_run_folders_of_a_name_are_not_those_of_a_longer_name(tmp_path):
    for folder in ("gn-20261207-101010", "gn-20261207-111111-1", "gn-half-20261207-101010", "gn-x",
                   "gnat-20261207-101010"):
        (tmp_path / folder).mkdir()
    assert [p.name for p in run_dirs_named(tmp_path, "gn")] == ["gn-20261207-101010", "gn-20261207-111111-1"]
    assert [p.name for p in run_dirs_named(tmp_path, "gn-half")] == ["gn-half-20261207-101010"]


def test_the_headline_is_the_handed_on_weights_at_the_test_resolution():
    sweep = [{"phase": "train", "resolution": 128, "top1": 0.5}, {"phase": "finetune", "resolution": 128, "top1": 0.6}]
    native = {"finetune_resolution": None, "val": {"train/top1@96": 0.4}, "sweep": sweep}
    assert headline(native, 96) == 0.4 and headline(native, 128) == 0.5  # its own validation, else the sweep's
    averaged = {"finetune_resolution": None, "sweep": [],
                "val": {"train/top1@96": 0.4, "train/epoch_avg/top1@96": 0.45}}
    assert headline(averaged, 96) == 0.45 and headline(averaged, 128) is None
    tuned = {"finetune_resolution": 128, "val": {"train/top1@128": 0.5, "finetune/top1@128": 0.55}, "sweep": sweep}
    assert headline(tuned, 128) == 0.55


def test_the_pareto_front_keeps_what_nothing_beats_on_cost_and_accuracy():
    points = [(10, 70.0), (5, 60.0), (7, 59.0), (12, 69.0), (20, 75.0), (5, 61.0)]
    assert pareto(points) == [(5, 61.0), (10, 70.0), (20, 75.0)]
