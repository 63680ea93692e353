"""python -m bench.inference: one JSON line per (preset, engine, batch) with in-round ratios, and the IPU inference
model of a recipe compiled for an offline target against the strict PopTorch fake. No timing is asserted: speed is
measured by running the benchmark, not in tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_export import train_checkpoint

from bench.inference import Engine, checkpoint_model, export_model, main, ratio
from fake_poptorch import install
from train.export import main as export_main

#: End-to-end command tests (real checkpoints, exports, ONNX Runtime): `make test` runs them, not `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_lines_have_every_engine_and_the_ratios(capsys):
    assert main(["--device", "cpu", "--models", "efficientnet-b0-g16-ln-pn", "--resolution", "32",
                 "--batch-sizes", "1,3", "--engines", "eager,folded,onnxruntime", "--rounds", "2", "--iters", "1",
                 "--warmup", "0", "--threads", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["engine"], x["batch_size"]) for x in lines] == [
        ("eager", 1), ("folded", 1), ("onnxruntime", 1), ("eager", 3), ("folded", 3), ("onnxruntime", 3)]
    folded = lines[1]
    assert folded["latency_ms"] > 0 and folded["vs_eager"] > 0 and folded["rounds"] == 2
    assert "latency_ms" not in lines[4] and lines[4]["images_per_s"] > 0
    assert lines[2]["vs_folded"] > 0


def test_ratios_are_taken_within_rounds():
    ours = Engine("a", "folded", lambda: None, times=[[1.0], [4.0], [1.0]])
    theirs = Engine("a", "eager", lambda: None, times=[[2.0], [8.0], [3.0]])
    assert ratio(ours, theirs) == 2.0  # per round 2, 2, 3: a slow round does not skew it


def test_unknown_engine_or_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--engines", "tensorrt"])
    assert main(["--models", "efficientnet-b9", "--batch-sizes", "1"]) == 2
    assert "no model preset" in capsys.readouterr().err


def test_ipu_inference_model_of_a_recipe_compiles_offline(monkeypatch, capsys):
    poptorch = install(monkeypatch)
    recipe = ROOT / "configs" / "ipu" / "pod16-b0-g16-ln-pn-half.yml"
    assert main(["--ipu-config", str(recipe)]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["compiled"] and line["engine"] == "ipu" and line["phase"] == "finetune"
    (executor,) = poptorch.STATE.executors
    assert executor.isCompiled() and not executor.isAttachedToDevice()  # offline target: nothing attached
    assert executor.options.connection_type == int(poptorch.ConnectionType.Never)
    assert executor.options.Training.gradient_accumulation == 1
    assert executor.compile_shapes[0][0] == line["batch_per_call"]


def test_ipu_without_poptorch_is_one_line(capsys):
    recipe = ROOT / "configs" / "ipu" / "pod16-b0-g16-ln-pn-half.yml"
    assert main(["--ipu-config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "PopTorch" in err


def test_a_checkpoint_and_its_export_are_timed_with_their_own_weights_and_resolution(shared_cifar_tarball, tmp_path,
                                                                                   capsys):
    checkpoint = train_checkpoint(shared_cifar_tarball, tmp_path / "runs")
    export = tmp_path / "m.safetensors"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(export)]) == 0
    capsys.readouterr()
    assert main(["--device", "cpu", "--checkpoint", str(checkpoint), "--model", str(export), "--batch-sizes", "2",
                 "--engines", "eager,folded", "--rounds", "1", "--iters", "1", "--warmup", "0", "--threads", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["model"], x["engine"]) for x in lines] == [
        (checkpoint.name, "eager"), (checkpoint.name, "folded"), (export.name, "eager"), (export.name, "folded")]
    assert {x["resolution"] for x in lines} == {32}  # the checkpoint's eval resolution, not the presets' 224
    # Both are the trained network (not a preset's random weights): the same logits from the two files.
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(checkpoint_model(checkpoint).network(x), export_model(export).network(x))
    for bad, words in [(tmp_path / "m.onnx", "exports ONNX itself"), (tmp_path / "none.safetensors", "does not exist")]:
        assert main(["--device", "cpu", "--model", str(bad), "--batch-sizes", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
