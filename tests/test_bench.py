"""The throughput benchmark runs end to end on a CPU and prints well-formed lines; no speed is asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from bench.throughput import main

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--device", "cpu", "--resolutions", "64", "--steps", "2", "--warmup", "1", "--batch-size", "2",
        "--threads", "1"]
HAS_TIMM = importlib.util.find_spec("timm") is not None


def check_line(line: Dict, model: str, resolution: int) -> None:
    assert (line["model"], line["resolution"]) == (model, resolution)
    for key in ("images_per_s", "step_ms_median", "step_ms_min", "params", "macs"):
        assert line[key] > 0, key
    assert line["peak_mem_mb"] is None or line["peak_mem_mb"] > 0
    assert line["mem_kind"] == "cpu_peak_rss_delta" and line["device"].startswith("cpu")


def parse(stdout: str) -> List[Dict]:
    return [json.loads(text) for text in stdout.splitlines()]


@pytest.mark.slow
def test_cli_with_timm_comparison() -> None:
    args = TINY + ["--models", "efficientnet-b0-g16-ln-pn"]
    if HAS_TIMM:
        args += ["--compare-timm", "--timm-resolution", "32"]
    done = subprocess.run([sys.executable, "-m", "bench.throughput", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = parse(done.stdout)
    ours = lines[-1]
    check_line(ours, "efficientnet-b0-g16-ln-pn", 64)
    if HAS_TIMM:
        expected = [("timm:efficientnet_b0", 32), ("timm:efficientnet_b0", 64), ("timm:efficientnet_b0_gn", 32),
                    ("timm:efficientnet_b0_gn", 64)]
        assert [(line["model"], line["resolution"]) for line in lines[:-1]] == expected
        for line, (model, res) in zip(lines, expected):
            check_line(line, model, res)
        for key in ("vs_timm_efficientnet_b0", "vs_timm_efficientnet_b0_gn", "vs_timm_efficientnet_b0_32"):
            assert ours[key] > 0, key
        assert ours["vs_timm_efficientnet_b0"] == round(ours["images_per_s"] / lines[1]["images_per_s"], 3)
    else:
        assert len(lines) == 1


@pytest.mark.slow
def test_bf16_channels_last_in_process(capsys: pytest.CaptureFixture) -> None:
    argv = TINY + ["--models", "efficientnet-b0-g1-bn,efficientnet-b0-g16-gn", "--resolutions", "32,48",
                   "--precision", "bf16", "--channels-last", "--optimizer", "sgd", "--steps", "1"]
    assert main(argv) == 0
    lines = parse(capsys.readouterr().out)
    assert [(x["model"], x["resolution"]) for x in lines] == [
        ("efficientnet-b0-g1-bn", 32), ("efficientnet-b0-g1-bn", 48),
        ("efficientnet-b0-g16-gn", 32), ("efficientnet-b0-g16-gn", 48)]
    for line in lines:
        check_line(line, line["model"], line["resolution"])
        assert (line["precision"], line["channels_last"], line["optimizer"]) == ("bf16", True, "sgd")
    assert lines[1]["macs"] > lines[0]["macs"]  # more pixels, more work


@pytest.mark.slow
def test_interleaved_rounds_norm_paths_and_saved_memory(capsys: pytest.CaptureFixture) -> None:
    """Every (model, norm path) runs in each round; ratios to the reference come per round; the saved-activation
    count is exact, so the proxy-norm modules' extra saved tensors show against the Function's."""
    ref = "efficientnet-b0-g16-gn[function]"
    argv = TINY + ["--models", "efficientnet-b0-g16-gn,efficientnet-b0-g16-ln-pn", "--norm-impl",
                   "function,modules", "--reference", ref, "--repeats", "2", "--steps", "1"]
    assert main(argv) == 0
    lines = {line["model"]: line for line in parse(capsys.readouterr().out)}
    assert list(lines) == ["efficientnet-b0-g16-gn[function]", "efficientnet-b0-g16-gn[modules]",
                           "efficientnet-b0-g16-ln-pn[function]", "efficientnet-b0-g16-ln-pn[modules]"]
    for label, line in lines.items():
        check_line(line, label, 64)
        assert len(line["images_per_s_rounds"]) == 2 and line["images_per_cpu_s"] > 0 and line["saved_mb"] > 0
        assert (f"vs_{ref}" in line) == (label != ref)
    pn, pn_modules = lines["efficientnet-b0-g16-ln-pn[function]"], lines["efficientnet-b0-g16-ln-pn[modules]"]
    assert pn_modules["saved_mb"] > 1.3 * pn["saved_mb"]
    assert pn[f"saved_vs_{ref}"] == round(pn["saved_mb"] / lines[ref]["saved_mb"], 3)


def test_unknown_preset_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["--device", "cpu", "--models", "efficientnet-b9-g16"]) == 2
    err = capsys.readouterr().err
    assert "no model preset 'efficientnet-b9-g16'" in err and "efficientnet-b0-g16-ln-pn" in err


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--precision", "fp16"], "fp16 needs --device cuda"),
    (["--resolutions", "160,x"], "not a comma-separated list of integers"),
    (["--steps", "0"], "must be >= 1"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead needs --compile"),
    (["--norm-impl", "fast"], "--norm-impl 'fast' is not one of auto, modules, function, triton"),
    (["--models", "efficientnet-b0-g16-gn", "--reference", "efficientnet-b0-g1-bn"],
     "--reference 'efficientnet-b0-g1-bn' is not one of the configurations: efficientnet-b0-g16-gn"),
])
def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture, argv: List[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
