"""checkpoint.keep_best keeps the checkpoint of the best validation top-1, and a run logs each phase's final and best
checkpoint as W&B artifacts, recorded locally by an offline run (checked at W&B's public API: ``wandb_calls``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_export import tiny_cifar

from conftest import WandbCalls
from train.checkpoint import find_resumable, load_checkpoint
from train.cli import main as train_main

#: End-to-end command tests (real checkpoints, exports, ONNX Runtime): `make test` runs them, not `make test-fast`.
pytestmark = pytest.mark.slow


def test_best_checkpoint_is_kept_and_both_are_logged_as_artifacts(shared_cifar_tarball, tmp_path, monkeypatch,
                                                                  wandb_calls: WandbCalls):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    args = ["--set", f"logging.run_dir={tmp_path / 'runs'}"]
    for item in tiny_cifar(shared_cifar_tarball) + ["data.train_subset=32", "train.epochs=3", "optimizer.lr=0.2",
                                                     "checkpoint.keep_best=true", "logging.wandb=offline"]:
        args += ["--set", item]
    assert train_main(args) == 0
    (run,) = sorted((tmp_path / "runs").iterdir())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [(line["val/top1@32"], line["phase_step"]) for line in lines if "val/top1@32" in line]
    assert len(scored) == 3  # after epochs 1 and 2, and at the end
    best_top1 = max(top1 for top1, _ in scored)
    best_step = next(step for top1, step in scored if top1 == best_top1)  # ties keep the earlier one
    best = load_checkpoint(run / "checkpoints" / "train-best.pt")
    assert best["position"]["step"] == best_step
    summary = [line for line in lines if line.get("kind") == "summary"][-1]
    assert summary["train/best/val/top1@32"] == best_top1 and summary["train/best/phase_step"] == best_step
    # --resume auto still takes the furthest checkpoint, not the best one.
    assert find_resumable([run]).name == "train-final.pt"

    logged = [(artifact, aliases) for _, artifact, aliases in wandb_calls.artifacts]
    assert [(a.name, a.type, aliases) for a, aliases in logged] == [
        ("run-train", "model", ["final"]), ("run-train", "model", ["best"])]
    for (artifact, _), name in zip(logged, ["train-final.pt", "train-best.pt"], strict=True):
        (entry,) = artifact.manifest.entries.values()
        assert entry.path == name and Path(entry.local_path).is_file()  # staged locally for wandb sync
        assert artifact.metadata["checkpoint"] == name
        assert artifact.metadata["train/best/val/top1@32"] == best_top1
    assert [code for _, code in wandb_calls.finishes] == [0]


@pytest.mark.parametrize("keep_best", ["false"])
def test_without_keep_best_there_is_no_best_checkpoint(shared_cifar_tarball, tmp_path, keep_best):
    args = ["--set", f"logging.run_dir={tmp_path / 'runs'}"]
    for item in tiny_cifar(shared_cifar_tarball) + ["data.train_subset=32", f"checkpoint.keep_best={keep_best}"]:
        args += ["--set", item]
    assert train_main(args) == 0
    (run,) = sorted((tmp_path / "runs").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["train-final.pt"]
