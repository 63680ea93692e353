"""The IPU backend with the real PopTorch: runs wherever ``poptorch`` imports (a Poplar SDK environment), is
skipped elsewhere. Without IPU hardware, set ``POPTORCH_IPU_MODEL=1`` to run on PopTorch's IPU Model (slow), or
run only the offline compile test (``-k compile``)."""

import json
import os
import warnings

import pytest
import torch

poptorch = pytest.importorskip("poptorch", reason="PopTorch ships only with the Poplar SDK; these tests run there")

from conftest import TINY_MODEL  # noqa: E402
from ipu_options.__main__ import main as ipu_main  # noqa: E402
from train.checkpoint import load_checkpoint  # noqa: E402
from train.cli import main as train_main  # noqa: E402

# One IPU, no pipeline: the smallest thing that exercises options, wrapping, data loading and validation.
TINY = TINY_MODEL + [
    "train.backend=ipu", "data.dataset=generated", "data.generated_samples=64", "data.generated_classes=10",
    "data.workers=0", "data.val_subset=32", "train.resolution=32", "train.micro_batch_size=4",
    "train.gradient_accumulation=2", "train.epochs=1", "optimizer.reference_batch=256", "schedule.name=cosine",
    "schedule.warmup_epochs=0", "logging.wandb=disabled", "logging.log_every=1", "precision.compute='16.16'",
    "ipu.dataloader_mode=sync"]


def _args(items):
    out = []
    for item in items:
        out += ["--set", item]
    return out


def _has_ipus() -> bool:
    return bool(os.environ.get("POPTORCH_IPU_MODEL")) or os.path.exists("/dev/ipu0") or \
        bool(os.environ.get("IPUOF_CONFIG_PATH")) or bool(os.environ.get("IPUOF_VIPU_API_HOST"))


@pytest.mark.slow
def test_compile_only_for_an_offline_target(capsys):
    assert ipu_main(_args(TINY) + ["--compile-only"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["compiled"] is True


@pytest.mark.slow
@pytest.mark.skipif(not _has_ipus(), reason="no IPU found (set POPTORCH_IPU_MODEL=1 to use the IPU Model)")
def test_a_few_training_steps_and_validation_on_ipu(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(_args(TINY + [f"logging.run_dir={tmp_path}"])) == 0
    (run,) = tmp_path.iterdir()
    state = load_checkpoint(run / "checkpoints" / "train-final.pt")
    assert state["backend"]["kind"] == "ipu"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/top1@32" in m for m in metrics)


@pytest.mark.slow
@pytest.mark.skipif(not _has_ipus(), reason="no IPU found (set POPTORCH_IPU_MODEL=1 to use the IPU Model)")
def test_two_stage_pipeline_on_two_ipus(tmp_path):
    items = TINY + [f"logging.run_dir={tmp_path}", "train.gradient_accumulation=3",
                    "ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 1, recompute: true}]"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(_args(items)) == 0
