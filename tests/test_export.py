"""python -m train.export: safetensors rebuilt from the file alone, ONNX checked in ONNX Runtime against PyTorch on
real CIFAR-10 JPEGs for every norm variant, the PopEF path against the strict PopTorch fake, and one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from test_inference_form import VARIANTS, trained_like

from conftest import TINY_MODEL
from fake_poptorch import install
from models import ModelConfig, build_model, exported_file, load_exported
from numerics import fp_bound, summed_terms
from train.checkpoint import load_checkpoint, save_checkpoint
from train.cli import main as train_main
from train.config import load_config
from train.export import Trained, export_onnx, load_trained, main, validation_images, verify_onnx

#: End-to-end command tests (real checkpoints, exports, ONNX Runtime): `make test` runs them, not `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def tiny_cifar(tarball: Path) -> List[str]:
    """A tiny B0-G16-LN+PN trained for one short epoch on CIFAR-10 JPEGs, with an epoch average and an EMA."""
    return TINY_MODEL + [
        "data.dataset=tar", f"data.path={tarball}", "data.workers=0", "data.train_subset=48", "data.val_subset=40",
        "train.resolution=32", "train.micro_batch_size=16", "train.val_batch_size=40", "train.epochs=1",
        "train.ema_decay=0.9", "optimizer.lr=0.05", "optimizer.reference_batch=256", "schedule.warmup_epochs=0",
        "logging.wandb=disabled"]


def train_checkpoint(tarball: Path, root: Path, *extra: str) -> Path:
    args = ["--set", f"logging.run_dir={root}"]
    for item in tiny_cifar(tarball) + list(extra):
        args += ["--set", item]
    assert train_main(args) == 0
    (run,) = sorted(root.iterdir())
    return run / "checkpoints" / "train-final.pt"


@pytest.fixture(scope="module")
def checkpoint(shared_cifar_tarball, tmp_path_factory) -> Path:
    return train_checkpoint(shared_cifar_tarball, tmp_path_factory.mktemp("runs"))


def last_json(capsys) -> dict:
    """The command's last JSON line; every line on stdout must be one (tools parse it)."""
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()][-1]


# ------------------------------------------------------------------------------------------------ safetensors
@pytest.mark.parametrize("weights", ["averaged", "ema", "raw"])
def test_safetensors_reloads_from_the_file_alone_with_identical_logits(checkpoint, tmp_path, capsys, weights):
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--weights", weights]) == 0
    assert last_json(capsys)["weights"] == weights
    trained = load_trained(checkpoint, [], weights)
    images = validation_images(trained.cfg, 32, 8)[0]
    exported = load_exported(out, form="training")
    classifier = exported.classifier()
    with torch.no_grad():
        reference = classifier.normalize(images)
        assert torch.equal(exported.network(reference), trained.network(reference))
        folded = load_exported(out).network(reference)
    gap = float((folded - trained.network(reference).detach()).abs().max() / folded.abs().max())
    assert gap <= fp_bound(torch.float32, summed_terms(trained.network, reference))  # folding: tests/numerics.py
    assert exported.class_names[:3] == ["airplane", "automobile", "bird"]
    assert exported.preprocessing.resolution == 32 and exported.preprocessing.crop_pct == 0.875
    assert exported.metadata["weights"] == weights and exported.config.group_dim == 16


def test_weight_kinds_differ_and_a_missing_kind_is_one_line(checkpoint, tmp_path, capsys):
    states = [load_trained(checkpoint, [], kind).network.state_dict() for kind in ("averaged", "ema", "raw")]
    key = "classifier.weight"
    assert not torch.equal(states[0][key], states[1][key]) and not torch.equal(states[1][key], states[2][key])
    state = load_checkpoint(checkpoint)
    state["averages"].pop("ema")
    bare = save_checkpoint(state, tmp_path / "no-ema.pt")
    capsys.readouterr()
    assert main(["--checkpoint", str(bare), "--out", str(tmp_path / "x.safetensors"), "--weights", "ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no ema weights" in err and "train.ema_decay" in err


def test_loading_reads_no_pickle_and_needs_no_training_code(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0

    def refuse(*_args, **_kwargs):
        raise AssertionError("an exported model was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_exported(out)
    # A fresh interpreter in which the train package cannot be imported at all.
    script = ("import sys; sys.modules['train'] = None\n"
              "import torch, models\n"
              f"m = models.load_exported({str(out)!r})\n"
              "x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)\n"
              "print(m.classifier()(x).shape[1], m.class_names[0])\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["10", "airplane"]


def test_damaged_or_foreign_files_are_one_line_errors(tmp_path):
    from models import ExportError

    with pytest.raises(ExportError, match="does not exist"):
        load_exported(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ExportError, match="junk.safetensors"):
        load_exported(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ExportError, match="not written by train.export"):
        load_exported(foreign)


# ------------------------------------------------------------------------------------------------------ ONNX
def test_onnx_cli_verifies_on_real_images_and_has_a_dynamic_batch(checkpoint, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--resolution", "48",
                 "--verify-samples", "24"]) == 0
    line = last_json(capsys)
    assert line["verified_images"] == 24 and line["top1_agreement"] == 1.0
    assert line["max_rel_logit_diff"] <= 1e-4 and line["opset"] == 17
    graph = onnx.load(str(out))
    assert graph.opset_import[0].version == 17
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["class_names"])[0] == "airplane" and meta["input"] == "uint8"
    assert json.loads(meta["preprocessing"])["resolution"] == 48
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    assert feed.type == "tensor(uint8)" and feed.shape[1:] == [3, 48, 48] and isinstance(feed.shape[0], str)
    trained = load_trained(checkpoint, [])
    batch = validation_images(trained.cfg, 48, 5)[0]
    images = batch.numpy()
    together = session.run(None, {"images": images})[0]
    alone = np.concatenate([session.run(None, {"images": images[i:i + 1]})[0] for i in range(5)])
    # a batch and its images one by one: the same sums in other orders (tests/numerics.py; the count needs shapes only)
    bound = fp_bound(torch.float32, summed_terms(trained.network, batch.float()))
    assert together.shape == (5, 10) and np.abs(together - alone).max() <= bound * np.abs(together).max()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["b0-g1-bn", "b0-g16-gn", "b0-g16-ln-pn", "v2-b0-g16-ln-pn"])
def test_onnx_runtime_matches_pytorch_for_every_variant_at_two_resolutions(shared_cifar_tarball, tmp_path,
                                                                          variant):
    cfg = load_config(None, ["data.dataset=tar", f"data.path={shared_cifar_tarball}", "data.workers=0",
                             "model.num_classes=10"] + [f"model.{k}={v}" for k, v in VARIANTS[variant].items()])
    model = trained_like(ModelConfig(**{**vars(cfg.model)}))
    trained = Trained(cfg, model, "raw", tmp_path / "none.pt", "train", 0)
    names = [str(i) for i in range(10)]
    for resolution in (64, 96):
        out = tmp_path / f"{variant}-{resolution}.onnx"
        export_onnx(trained, out, names, resolution, "uint8")
        images, _ = validation_images(cfg, resolution, 8)
        result = verify_onnx(out, trained, images, "uint8")
        assert result["max_rel_logit_diff"] <= 1e-4, (resolution, result)
        assert result["top1_agreement"] == 1.0


def test_float_input_graph_takes_normalised_images(checkpoint, tmp_path, capsys):
    out = tmp_path / "float.onnx"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--input", "float",
                 "--verify-samples", "8"]) == 0
    line = last_json(capsys)
    assert line["input"] == "float" and line["top1_agreement"] == 1.0 and line["max_rel_logit_diff"] <= 1e-4


# ------------------------------------------------------------------------------------------------------ PopEF
IPU = ["train.backend=ipu", "precision.compute=16.16", "train.gradient_accumulation=3", "ipu.eval_device_iterations=4",
       "ipu.eval_micro_batch_size=3", "ipu.pipeline=[{start: stem, ipu: 0}, {start: blocks.3.0, ipu: 1}]"]


def test_popef_is_compiled_with_the_validation_options_of_the_recipe(checkpoint, tmp_path, monkeypatch, capsys):
    poptorch = install(monkeypatch)
    out = tmp_path / "serving" / "model.popef"
    args = ["--checkpoint", str(checkpoint), "--out", str(out)]
    for item in IPU:
        args += ["--set", item]
    assert main(args) == 0
    line = last_json(capsys)
    assert line["batch_per_call"] == 12 and line["ipus_per_replica"] == 2 and line["precision"] == "16.16"
    record = json.loads(out.read_text())
    assert record["fake_popef"] and not record["training"] and record["export_model"] is False
    assert record["inputs"] == [[[12, 3, 32, 32], "torch.uint8"]]
    options = record["options"]
    assert options["gradient_accumulation"] == 1 and options["device_iterations"] == 4
    assert options["output_mode"] == int(poptorch.OutputMode.All)
    assert options["connection_type"] == int(poptorch.ConnectionType.Never)  # offline target: no IPU needed
    (executor,) = poptorch.STATE.executors
    network = executor.model.network
    assert network.blocks[3][0]._fake_block == ("stage1", 1) and network.stem._fake_block == ("stage0", 0)
    assert network.stem.conv.weight.dtype == torch.float16  # 16.16: half weights, norms in float
    assert not executor.model.training


def test_popef_without_poptorch_is_one_line(checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.popef")]
    for item in IPU:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "PopTorch" in err and "Poplar SDK" in err


# ----------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_are_one_line_errors(checkpoint, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a.onnx")], "does not exist"),
        (["--checkpoint", str(corrupt), "--out", str(tmp_path / "a.onnx")], "corrupt"),
        (["--checkpoint", str(checkpoint), "--out", str(tmp_path / "a.bin")], "suffix"),
        (["--checkpoint", str(checkpoint), "--out", str(tmp_path / "a.onnx"), "--set", "model.num_classes=5"],
         "does not fit this model"),
        (["--checkpoint", str(checkpoint), "--out", str(tmp_path / "a.onnx"), "--set", "data.path=/nowhere"],
         "/nowhere"),
        # --out under a regular file: the folder cannot be made (a real OSError from the file system)
        (["--checkpoint", str(checkpoint), "--out", str(corrupt / "model.safetensors")], "cannot write it"),
        (["--checkpoint", str(checkpoint), "--out", str(corrupt / "model.onnx"), "--verify-samples", "0"],
         "cannot write it"),
    ]
    for args, words in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (args, err)


def test_an_interrupted_export_is_one_line_and_130(checkpoint, tmp_path, capsys, monkeypatch):
    """Ctrl-C outside a training loop: exit 130 and one line, and no half-written file at --out."""
    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(exported_file, "save_file", interrupted)
    out = tmp_path / "exports" / "model.safetensors"
    capsys.readouterr()
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err
    assert list(out.parent.iterdir()) == [], "neither the partial file nor anything at --out"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_and_exports_follow_the_umask(tmp_path, umask):
    """Files a run hands to people get the mode the user's umask gives (safetensors and mkstemp create them
    owner-only)."""
    cfg = load_config(None, TINY_MODEL + ["model.num_classes=3"]).model
    pre = exported_file.EvalPreprocessing(32, 0.875, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    old = os.umask(umask)
    try:
        checkpoint = save_checkpoint({"x": torch.zeros(2)}, tmp_path / "c.pt")
        export = exported_file.save_exported(tmp_path / "m.safetensors", cfg, build_model(cfg).state_dict(),
                                             ["a", "b", "c"], pre, {})
    finally:
        os.umask(old)
    for path in (checkpoint, export):
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask), path
