"""python -m train.predict on real CIFAR-10 JPEGs: the same top-1 as train.validate, the same answers from a
checkpoint and from its export, corrupt and missing files named, and train.validate's results file."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

import pytest
from test_export import train_checkpoint

from train.export import main as export_main
from train.predict import main
from train.validate import main as validate_main

#: End-to-end command tests (real checkpoints, exports, ONNX Runtime): `make test` runs them, not `make test-fast`.
pytestmark = pytest.mark.slow

PER_CLASS = 4


@pytest.fixture(scope="module")
def folder(shared_cifar_tarball, tmp_path_factory) -> Path:
    """``<root>/test/<class>/*.jpg``: the first PER_CLASS test JPEGs of every class, as an image folder."""
    root = tmp_path_factory.mktemp("cifar")
    taken: Dict[str, int] = {}
    with tarfile.open(shared_cifar_tarball) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "test" and taken.get(parts[1], 0) < PER_CLASS:
                taken[parts[1]] = taken.get(parts[1], 0) + 1
                target = root / "test" / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    assert len(taken) == 10
    return root


@pytest.fixture(scope="module")
def checkpoint(shared_cifar_tarball, tmp_path_factory) -> Path:
    return train_checkpoint(shared_cifar_tarball, tmp_path_factory.mktemp("runs"))


def lines(out: str) -> List[dict]:
    return [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]


def on_folder(folder: Path) -> List[str]:
    return ["--set", "data.dataset=imagefolder", "--set", f"data.path={folder}", "--set", "data.val_subset=null"]


def test_predict_gives_the_top1_of_validate(checkpoint, folder, tmp_path, capsys):
    assert main(["--checkpoint", str(checkpoint), str(folder / "test"), "--topk", "3", "--workers", "0",
                 *on_folder(folder)]) == 0
    results = lines(capsys.readouterr().out)
    assert len(results) == 10 * PER_CLASS
    for r in results:
        probs = [t["prob"] for t in r["topk"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    hits = sum(r["topk"][0]["label"] == Path(r["path"]).parent.name for r in results)
    out_file = tmp_path / "val.csv"
    assert validate_main(["--checkpoint", str(checkpoint), "--resolutions", "32", "--device", "cpu",
                          "--results-file", str(out_file), *on_folder(folder)]) == 0
    (row,) = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert float(row["top1"]) == hits / len(results)
    assert row["weights"] == "averaged" and row["crop_pct"] == "0.875" and row["interpolation"] == "bilinear"


def test_an_export_answers_as_its_checkpoint(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out), *on_folder(folder)]) == 0
    capsys.readouterr()
    images = [str(folder / "test" / "cat"), str(next((folder / "test" / "ship").iterdir()))]
    assert main(["--checkpoint", str(checkpoint), *images, "--workers", "0", *on_folder(folder)]) == 0
    from_checkpoint = lines(capsys.readouterr().out)
    assert main(["--model", str(out), *images, "--workers", "1"]) == 0
    from_export = lines(capsys.readouterr().out)
    assert [r["path"] for r in from_export] == [r["path"] for r in from_checkpoint] and len(from_export) == 5
    for a, b in zip(from_checkpoint, from_export, strict=True):
        assert [t["label"] for t in a["topk"]] == [t["label"] for t in b["topk"]]
        assert all(abs(x["prob"] - y["prob"]) < 1e-5 for x, y in zip(a["topk"], b["topk"], strict=True))


def predict_command(*args: str) -> subprocess.CompletedProcess:
    """``python -m train.predict`` as a user runs it, from the repository root."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "train.predict", *args], cwd=root, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("input_kind", ["uint8", "float"])
def test_an_onnx_export_answers_as_its_checkpoint_through_the_cli(checkpoint, folder, tmp_path, capsys, input_kind):
    out = tmp_path / "m.onnx"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--input", input_kind,
                        "--verify-samples", "0", *on_folder(folder)]) == 0
    images = [str(folder / "test" / "cat"), str(next((folder / "test" / "ship").iterdir()))]
    capsys.readouterr()
    assert main(["--checkpoint", str(checkpoint), *images, "--workers", "0", *on_folder(folder)]) == 0
    from_checkpoint = lines(capsys.readouterr().out)
    done = predict_command("--model", str(out), *images, "--workers", "0")
    assert done.returncode == 0, done.stderr
    from_onnx = lines(done.stdout)
    assert [r["path"] for r in from_onnx] == [r["path"] for r in from_checkpoint] and len(from_onnx) == 5
    for a, b in zip(from_checkpoint, from_onnx, strict=True):
        assert [t["label"] for t in a["topk"]] == [t["label"] for t in b["topk"]]
        # fp32 logits of the same folded graph in two runtimes: probabilities agree to well under 1e-4
        assert all(abs(x["prob"] - y["prob"]) < 1e-4 for x, y in zip(a["topk"], b["topk"], strict=True))
    # The graph has one resolution; another one, or a GPU for ONNX Runtime's CPU session, is one line, exit 2.
    for extra, words in [(["--resolution", "48"], "takes 32 px images only"), (["--device", "cuda"], "ONNX Runtime")]:
        done = predict_command("--model", str(out), images[1], *extra)
        errors = [e for e in done.stderr.splitlines() if e.startswith("error")]
        assert done.returncode == 2 and len(errors) == 1 and words in errors[0], done.stderr


def test_a_run_where_no_image_could_be_predicted_fails_through_the_cli(checkpoint, folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_text("not an image")
    (broken / "b.jpg").write_bytes(next((folder / "test" / "cat").iterdir()).read_bytes()[:100])
    done = predict_command("--checkpoint", str(checkpoint), str(broken), "--workers", "0", *on_folder(folder))
    assert done.returncode == 2 and done.stdout.strip() == ""
    errors = [e for e in done.stderr.splitlines() if e.startswith("error")]
    assert len(errors) == 1 and "no image could be predicted: all 2 failed" in errors[0], done.stderr
    assert [w for w in done.stderr.splitlines() if w.startswith("warning: skipped")] != []


def test_corrupt_images_are_named_and_skipped_or_fail_by_flag(checkpoint, folder, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = sorted((folder / "test" / "dog").iterdir())[:3]
    for i, path in enumerate(good):
        (mixed / f"{i}-ok.jpg").write_bytes(path.read_bytes())
    (mixed / "1-truncated.jpg").write_bytes(good[0].read_bytes()[:200])
    (mixed / "2-text.jpg").write_text("not an image")
    assert main(["--checkpoint", str(checkpoint), str(mixed), "--workers", "0", "--batch-size", "2",
                 *on_folder(folder)]) == 0
    captured = capsys.readouterr()
    assert sorted(Path(r["path"]).name for r in lines(captured.out)) == ["0-ok.jpg", "1-ok.jpg", "2-ok.jpg"]
    warnings = [w for w in captured.err.splitlines() if w.startswith("warning: skipped")]
    assert len(warnings) == 2 and "1-truncated.jpg" in warnings[0] and "2-text.jpg" in warnings[1]
    assert "2 of 5 images skipped" in captured.err
    assert main(["--checkpoint", str(checkpoint), str(mixed), "--workers", "0", "--batch-size", "2",
                 "--fail-on-error", *on_folder(folder)]) == 2
    captured = capsys.readouterr()
    assert [Path(r["path"]).name for r in lines(captured.out)] == ["0-ok.jpg", "1-ok.jpg"]  # printed before it
    errors = [e for e in captured.err.splitlines() if e.startswith("error")]
    assert len(errors) == 1 and "1-truncated.jpg" in errors[0]


def test_missing_files_and_mismatched_checkpoints_are_one_line(checkpoint, folder, tmp_path, capsys):
    image = str(next((folder / "test" / "cat").iterdir()))
    cases = [
        (["--checkpoint", str(checkpoint), str(tmp_path / "nope.jpg")], "nope.jpg does not exist"),
        (["--checkpoint", str(checkpoint), image, "--set", "model.num_classes=5"], "does not fit this model"),
        (["--model", str(tmp_path / "none.safetensors"), image], "does not exist"),
        (["--checkpoint", str(tmp_path / "none.pt"), image], "does not exist"),
    ]
    for args, words in cases:
        capsys.readouterr()
        assert main(args + ["--workers", "0"]) == 2, args
        err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error")]
        assert len(err) == 1 and words in err[0], (args, err)


def test_validate_writes_json_results(checkpoint, folder, tmp_path):
    out = tmp_path / "results.json"
    assert validate_main(["--checkpoint", str(checkpoint), "--resolutions", "32,40", "--device", "cpu",
                          "--weights", "raw", "--results-file", str(out), "--set", "data.eval_crop_pct=1.0",
                          "--set", "data.interpolation=bicubic", *on_folder(folder)]) == 0
    rows = json.loads(out.read_text())
    assert [r["resolution"] for r in rows] == [32, 40]
    assert all(r["weights"] == "raw" and r["crop_pct"] == 1.0 and r["interpolation"] == "bicubic" for r in rows)
    assert validate_main(["--checkpoint", str(checkpoint), "--results-file", str(tmp_path / "r.txt")]) == 2
