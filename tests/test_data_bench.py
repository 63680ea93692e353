"""``python -m bench.data`` end to end on a small test set it makes from Fashion-MNIST: the JSON lines are complete
and well-formed. No speed is asserted (benchmarks measure speed; tests do not)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import needs_fashion

ROOT = Path(__file__).resolve().parents[1]
SPLIT_KEYS = ("read_ms", "decode_ms", "augment_ms", "collate_ms")


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.data", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
@needs_fashion
def test_make_test_images_then_benchmark_all_pipelines(tmp_path):
    made = bench("--make-test-images", str(tmp_path / "set"), "--source", "fashion-mnist", "--count", "40")
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["images"] == 48 and 0 < summary["bits_per_pixel"]
    files = sorted((tmp_path / "set").glob("*/*/*.jpg"))
    assert len(files) == 48 and {f.parts[-3] for f in files} == {"train", "val"}
    for path in files[:10]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and 300 <= max(image.size) <= 800

    for split, resolution in (("train", "160"), ("val", "224")):
        done = bench("--data", str(tmp_path / "set"), "--split", split, "--resolution", resolution,
                     "--workers", "1", "--images", "6", "--batch-size", "2", "--repeats", "2",
                     "--split-images", "6", "--compare-resize")
        assert done.returncode == 0, done.stderr
        host, *lines, resizes = [json.loads(line) for line in done.stdout.splitlines()]
        assert host["host"]["cores_usable"] >= 1 and host["host"]["jpeg_decoder"] in ("region", "simplejpeg", "pillow")
        assert [line["pipeline"] for line in lines] == ["torchvision", "fused", "plain"]
        for line in lines:
            assert line["split"] == split and line["images_per_s"] > 0
            assert line["images_per_s_per_worker"] == line["images_per_s"]  # one worker
            assert all(line[key] >= 0 for key in SPLIT_KEYS) and line["decode_ms"] > 0
            assert line["ratio_vs_torchvision"] > 0
            low, high = line["ratio_range"]
            assert 0 < low <= high
        assert lines[0]["ratio_vs_torchvision"] == 1.0 and lines[0]["ratio_range"] == [1.0, 1.0]
        assert abs(sum(lines[1]["dct_scales"].values()) - 1) < 1e-6
        check_resize_comparison(resizes, "train" if split == "train" else "eval", int(resolution))


def check_resize_comparison(line: dict, kind: str, resolution: int) -> None:
    """The ``--compare-resize`` line: every plain JPEG's crop timed by each resize, torch's pixels compared with
    Pillow's, or why torch was not timed."""
    assert (line["resize_compare"], line["resolution"], line["crops"]) == (kind, resolution, 6)
    assert line["filter"] == "bilinear" and line["c_resize"]
    timed = ["c", "pillow"] + ([] if "torch_unavailable" in line else ["torch"])
    assert sorted(line["crops_per_s"]) == sorted(timed) and all(v > 0 for v in line["crops_per_s"].values())
    if "torch" in timed:
        assert line["torch_vs_c"] > 0
        gaps = line["torch_vs_pillow_levels"]
        assert gaps["all"]["crops"] == 6 and 0 <= gaps["same_box"]["crops"] <= 6
        assert 0 <= gaps["all"]["share_over_1"] <= 1 and gaps["all"]["max"] <= 255


@pytest.mark.slow
def test_bad_arguments_are_one_line_errors(tmp_path):
    done = bench("--data", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(tmp_path / "nowhere") in done.stderr
    done = bench("--data", str(tmp_path), "--pipelines", "torchvision,dali")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'torchvision,dali'" in done.stderr and "expected some of torchvision" in done.stderr
    done = bench("--images", "0", "--data", str(tmp_path))
    assert done.returncode == 2 and "--images must be at least 1" in done.stderr
