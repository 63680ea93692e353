"""bench/gpu_check.sh, the GPU check in one command: its dry run on the CPU runs every step and writes the JSON lines
docs/benchmarks.md documents; a failing, hanging or out-of-budget step is recorded and the next one runs; the
pieces it adds to bench.throughput, bench.kernels and the pytest plugin do what they say. No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import pytest

from bench import gpu_check, kernels, throughput

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
LN_PN = "efficientnet-b0-g16-ln-pn"
GN = "efficientnet-b0-g16-gn"  # the dry run's model: its profile step takes the first of MODELS
STEP_ORDER = ["env", "tests", "kernels", "throughput-triton", "throughput-torch", "profile"]


def read_lines(path: Path) -> List[Dict[str, Any]]:
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    assert all(isinstance(line, dict) for line in lines), path
    return lines


def run_script(out: Path, *args: str, env: Dict[str, str] | None = None, timeout: int = 600
               ) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    full_env.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), f"OUT={out}", f"PY={sys.executable}", *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def final_status(steps: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The last record of every step (a step writes 'started', then its outcome)."""
    out: Dict[str, Dict[str, Any]] = {}
    for line in steps:
        if line["what"] == "step":
            out[line["step"]] = line
    return out


# ------------------------------------------------------------------------------------------------ the dry run
def _has_timm_and_triton() -> bool:
    import importlib.util

    from models import fused_norm

    return importlib.util.find_spec("timm") is not None and fused_norm.triton_error() is None


@pytest.mark.slow
@pytest.mark.needs_new_torch  # the Poplar SDK env has neither timm (a bench extra) nor Triton >= 3.0
@pytest.mark.skipif(not _has_timm_and_triton(), reason="the dry run needs timm and Triton >= 3.0 (its interpreter)")
def test_dry_run_runs_every_step_and_writes_the_documented_lines(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    # The dry run checks code paths and formats, not speed: limits far above its ~45 s on two idle cores, so that a
    # loaded machine cannot time a step out (the GPU limits are for an H100; a shared CI machine timed out profile).
    limits = [f"LIMIT_{step.upper().replace('-', '_')}=300" for step in STEP_ORDER]
    done = run_script(out, "--dry-run", "BUDGET_S=1800", *limits, timeout=1900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in STEP_ORDER:
        assert step in done.stdout  # each step says how it went and how long it took
    assert "done in" in done.stdout

    # steps.jsonl: the run, each step started then finished, throughput's plan and parts, the summary
    steps = read_lines(out / "steps.jsonl")
    assert steps[0]["what"] == "run" and steps[0]["dry_run"] is True and steps[0]["out"] == str(out)
    assert steps[-1]["what"] == "summary" and steps[-1]["failed"] == []
    finals = final_status(steps)
    assert list(finals) == STEP_ORDER
    assert steps[-1]["steps"] == {name: line["status"] for name, line in finals.items()}
    for name, line in finals.items():
        if name == "throughput-triton":  # the Triton path of a whole model is too slow in the interpreter
            assert line["status"] == "skipped" and "dry run" in line["reason"]
            continue
        assert line["status"] == "ok" and line["rc"] == 0, line
        assert 0 <= line["seconds"] <= line["limit_s"] and line["command"], line
        started = [s for s in steps if s["what"] == "step" and s["step"] == name and s["status"] == "started"]
        assert len(started) == 1 and steps.index(started[0]) < steps.index(line)
    plans = [s for s in steps if s["what"] == "plan"]
    expected_parts = ["eager", f"compile@32:{GN}", f"reduce-overhead@32:{GN}"]
    assert [p["parts"] for p in plans] == [expected_parts]
    parts = {p["part"]: p for p in steps if p["what"] == "part" and p["status"] != "started"}
    assert list(parts) == expected_parts
    assert all(p["status"] == "ok" and p["error"] is None and p["lines"] > 0 for p in parts.values()), parts

    # 1. env
    (env,) = read_lines(out / "env.jsonl")
    import torch

    assert env["what"] == "env" and env["torch"] == torch.__version__ and env["triton"] and env["timm"]
    assert env["cuda_available"] == torch.cuda.is_available() and isinstance(env["gpus"], list)
    for key in ("driver", "cuda_runtime", "cudnn", "python", "git_commit", "triton_error"):
        assert key in env, key

    # 2. the CUDA tests: every one selected by the marker; on a CPU all skip; none is missing the marker
    tests = read_lines(out / "tests.jsonl")
    summary = tests[-1]
    assert summary["what"] == "tests_summary" and summary["exitstatus"] == 0
    outcomes = [t for t in tests if t["what"] == "test"]
    assert outcomes and summary["total"] == len(outcomes) and summary["deselected"] > 0
    assert summary["unmarked_cuda_tests"] == 0 and not [t for t in tests if t["what"] == "unmarked_cuda_test"]
    nodeids = " ".join(t["nodeid"] for t in outcomes)
    assert "test_gpu_kernels_match_pytorch" in nodeids and "tests/test_norm_act_cuda.py::" in nodeids
    if not torch.cuda.is_available():
        assert {t["outcome"] for t in outcomes} == {"skipped"} and summary["skipped"] == summary["total"]
    assert summary["summary"].endswith("s") and f"{summary['total']}" in summary["summary"]
    assert (out / "tests.log").read_text().strip()

    # 3. kernels: the copy first, then each layout's shape on the three paths
    klines = read_lines(out / "kernels.jsonl")
    assert klines[0]["what"] == "copy" and klines[0]["gbs"] > 0
    assert [(k["layout"], k["path"]) for k in klines[1:]] == [
        (layout, path) for layout in ("nhwc", "nchw") for path in ("pytorch", "fused", "batchnorm")]
    for line in klines[1:]:
        assert line["shape"] == [2, 8, 6, 6] and line["fwdbwd_ms"] > 0 and line["dtype"] == "bf16"
        if line["path"] == "fused":
            assert line["gbs"] > 0 and line["frac_of_copy"] > 0 and "speedup_vs_pytorch" in line and line["config"]

    # 4. throughput: every line tagged with its part; our lines carry their path and the ratios to timm
    tlines = read_lines(out / "throughput.jsonl")
    by_part: Dict[str, List[Dict[str, Any]]] = {}
    for line in tlines:
        by_part.setdefault(line["part"], []).append(line)
    assert list(by_part) == expected_parts
    assert sorted(line["model"] for line in by_part["eager"]) == sorted([
        "timm:efficientnet_b0", "timm:efficientnet_b0_gn", f"{GN}[modules]", f"{GN}[function]"])
    for part, lines in by_part.items():
        mode = {"eager": False, "compile": "default", "reduce-overhead": "reduce-overhead"}[part.split("@")[0]]
        if mode:  # a compiled GN part: GN and its timm peer, efficientnet_b0_gn, compiled alike
            assert [line["model"] for line in lines] == ["timm:efficientnet_b0_gn", GN]
        for line in lines:
            assert line["resolution"] == 32 and line["batch_size"] == 2 and line["precision"] == "bf16"
            assert line["compile"] == mode and line["channels_last"] is True and line["images_per_s"] > 0
            if not line["model"].startswith("timm:"):
                assert line["vs_timm_efficientnet_b0_gn"] > 0 and ("vs_timm_efficientnet_b0" in line) == (not mode)
                assert line["norm_impl"] in ("auto", "modules", "function") and line["norm_units"] != "triton"
    assert {line["norm_impl"] for line in by_part["eager"] if "[" in line["model"]} == {"modules", "function"}

    # 5. profile: the fastest line of the model in step 4 and the eager path, top ops by time, and their tables
    plines = read_lines(out / "profile.jsonl")
    ours = [line for line in tlines if line["model"].split("[")[0] == GN]
    best = max(ours, key=lambda line: line["images_per_s"])
    (fastest,) = [p for p in plines if p["what"] == "profile_fastest"]
    assert (fastest["label"], fastest["part"], fastest["images_per_s"]) == (
        best["model"], best["part"], best["images_per_s"])
    totals = {p["path"]: p for p in plines if p["what"] == "profile_total"}
    assert list(totals) == ["fastest", "eager"] and not [p for p in plines if p["what"] == "profile_error"]
    assert totals["fastest"]["compile"] == best["compile"]
    assert totals["eager"]["compile"] is False and totals["eager"]["norm_impl"] == "auto"
    for path, total in totals.items():
        assert total["time_kind"] == "cpu_ops" and total["device"].startswith("cpu")  # the dry run's --device
        assert total["steps"] == 1 and total["step_ms"] > 0 and total["distinct"] >= 15
        rows = [p for p in plines if p["what"] == "profile" and p["path"] == path]
        assert [r["rank"] for r in rows] == list(range(1, 16))
        times = [r["self_ms_per_step"] for r in rows]
        assert times == sorted(times, reverse=True) and 0 < sum(r["share"] for r in rows) <= 1.0001
        assert sum(times) <= total["self_ms_per_step"] + 0.01  # the top rows of all the time
        table = (out / f"profile-{path}.txt").read_text()
        assert rows[0]["name"] in table


def test_failing_hanging_and_out_of_budget_steps_are_recorded_and_the_next_runs(tmp_path: Path) -> None:
    """The test hooks make env fail, tests hang past its 1 s limit and kernels fail: each is recorded with its
    status and exit code, the next step still runs, the summary names them and the script exits 1."""
    out = tmp_path / "failing"
    done = run_script(out, "--dry-run", "STEPS=env,tests,kernels", "LIMIT_TESTS=1",
                      env={"GPU_CHECK_FAIL": "env,kernels", "GPU_CHECK_HANG": "tests"}, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    steps = read_lines(out / "steps.jsonl")
    finals = final_status(steps)
    assert [(n, s["status"], s["rc"]) for n, s in finals.items()] == [
        ("env", "failed", 3), ("tests", "timeout", 124), ("kernels", "failed", 3)]
    assert finals["tests"]["limit_s"] == 1 and 1 <= finals["tests"]["seconds"] < 30
    assert steps[-1]["what"] == "summary" and steps[-1]["failed"] == ["env", "tests", "kernels"]
    assert "injected failure" in (out / "env.log").read_text()

    # a budget too small to start anything: every step is recorded as skipped, with why
    out = tmp_path / "budget"
    done = run_script(out, "--dry-run", "STEPS=env,profile", "BUDGET_S=3", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    finals = final_status(read_lines(out / "steps.jsonl"))
    assert [(n, s["status"]) for n, s in finals.items()] == [("env", "skipped"), ("profile", "skipped")]
    assert all(s["reason"].startswith("budget:") for s in finals.values())
    assert not (out / "env.jsonl").exists()


def test_script_refuses_an_unknown_argument_and_a_used_out(tmp_path: Path) -> None:
    done = run_script(tmp_path / "a", "--gpu")
    assert done.returncode == 2 and "unknown argument '--gpu'" in done.stderr
    done = run_script(tmp_path / "a", "LIMIT_NOPE=3")
    assert done.returncode == 2 and "no step 'nope'" in done.stderr
    out = tmp_path / "used"
    out.mkdir()
    (out / "steps.jsonl").write_text("{}\n")
    done = run_script(out, "--dry-run")
    assert done.returncode == 2 and "already holds a run" in done.stderr


def test_without_cuda_the_real_check_stops_after_env(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the stop on a machine without CUDA; this one has CUDA")
    done = run_script(tmp_path / "nocuda", timeout=120)
    assert done.returncode == 2 and "torch sees no CUDA device" in done.stderr
    steps = read_lines(tmp_path / "nocuda" / "steps.jsonl")
    assert [(s["step"], s["status"]) for s in steps if s["what"] == "step"] == [
        ("env", "started"), ("env", "ok"), ("check", "stopped")]
    assert read_lines(tmp_path / "nocuda" / "env.jsonl")[0]["cuda_available"] is False


def test_shellcheck_is_clean() -> None:
    import shutil

    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


# ---------------------------------------------------------------------------------------- the pytest plugin
PLUGIN_TESTS = '''
import pytest

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_unmarked():
    pass

@pytest.mark.cuda
@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_marked():
    pass

@pytest.mark.skipif(False, reason="this machine has CUDA")
def test_passes():
    assert 1 + 1 == 2

def test_fails():
    assert 1 + 1 == 3
'''


@pytest.mark.parametrize("select", [[], ["-m", "cuda"]], ids=["all", "marked"])
def test_pytest_plugin_writes_each_outcome_and_finds_unmarked_cuda_tests(tmp_path: Path, select: List[str]) -> None:
    (tmp_path / "test_sample.py").write_text(PLUGIN_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\nmarkers =\n    cuda: needs CUDA\n")
    jsonl = tmp_path / "out.jsonl"
    env = dict(os.environ, EFFNET_TESTS_JSONL=str(jsonl), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.pytest_jsonl", "-p", "no:cacheprovider",
                           "-q", *select, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = read_lines(jsonl)
    # the unmarked CUDA test is found before -m deselects it; the marked one and the non-CUDA skipif are not
    assert [(x["nodeid"].split("::")[1], x["reason"]) for x in lines if x["what"] == "unmarked_cuda_test"] == [
        ("test_unmarked", "needs a CUDA GPU")]
    outcomes = {x["nodeid"].split("::")[1]: x for x in lines if x["what"] == "test"}
    summary = lines[-1]
    assert summary["what"] == "tests_summary" and summary["unmarked_cuda_tests"] == 1
    if select:
        assert done.returncode == 0, done.stdout
        assert list(outcomes) == ["test_marked"] and outcomes["test_marked"]["outcome"] == "skipped"
        assert (summary["skipped"], summary["deselected"], summary["total"]) == (1, 3, 1)
        assert summary["summary"].startswith("1 skipped, 3 deselected in ")
        return
    assert done.returncode == 1, done.stdout
    assert {k: v["outcome"] for k, v in outcomes.items()} == {
        "test_unmarked": "skipped", "test_marked": "skipped", "test_passes": "passed", "test_fails": "failed"}
    assert outcomes["test_unmarked"]["message"] == "needs a CUDA GPU" and outcomes["test_passes"]["message"] is None
    assert "assert (1 + 1) == 3" in outcomes["test_fails"]["message"]
    assert (summary["passed"], summary["failed"], summary["skipped"], summary["total"], summary["exitstatus"]) == (
        1, 1, 2, 4, 1)
    assert summary["summary"].startswith("1 failed, 1 passed, 2 skipped in ")


# ------------------------------------------------------------------------------ what bench/ gained for the check
def test_norm_path_labels_and_configs() -> None:
    presets = {name: throughput.load_preset(name) for name in (LN_PN, "efficientnet-b0-g1-bn")}
    got = throughput.our_configs(presets, [LN_PN], ["triton", "modules", "function"])
    assert [label for label, _ in got] == [f"{LN_PN}[triton]", f"{LN_PN}[modules]", f"{LN_PN}[function]"]
    assert [c.norm_impl for _, c in got] == ["triton", "modules", "function"]
    assert all(replace(c, norm_impl="auto") == presets[LN_PN] for _, c in got)  # nothing else changes
    plain = throughput.our_configs(presets, [LN_PN, "efficientnet-b0-g1-bn"], [None])
    assert plain == [(LN_PN, presets[LN_PN]), ("efficientnet-b0-g1-bn", presets["efficientnet-b0-g1-bn"])]


@pytest.mark.parametrize("argv, message", [
    (["--models", "efficientnet-b0-g1-bn", "--norm-impl", "triton"], "efficientnet-b0-g1-bn uses batch norm"),
    (["--norm-impl", "fast"], "--norm-impl 'fast' is not one of auto, modules, function, triton"),
    (["--models", "efficientnet-b0-g16-gn", "--norm-impl", "triton"], "model.norm_impl: triton, but the fused"),
    (["--timm-models", "resnet50"], "--timm-models 'resnet50': choose from efficientnet_b0, efficientnet_b0_gn"),
])
def test_new_throughput_arguments_are_checked(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                              argv: List[str], message: str) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton on the CPU is refused before any timing
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_kernel_bench_layouts(capsys: pytest.CaptureFixture) -> None:
    args = kernels.build_parser().parse_args(["--layout", "nhwc,nchw"])
    assert args.layout == ["nhwc", "nchw"]
    assert kernels.build_parser().parse_args([]).layout == ["nhwc"]
    with pytest.raises(SystemExit):
        kernels.build_parser().parse_args(["--layout", "nhcw"])
    with pytest.raises(SystemExit) as exit_info:
        kernels.main(["--model", "efficientnet-b0", "--layout", "nhwc,nchw"])
    assert exit_info.value.code == 2 and "--model takes one --layout" in capsys.readouterr().err


def test_parts_in_priority_order_with_their_arguments() -> None:
    models = ["efficientnet-b0-g1-bn", LN_PN, "efficientnet-b0-g16-gn"]
    assert gpu_check.compile_parts(models, [160, 224])[:6] == [
        f"compile@160:{LN_PN}", f"reduce-overhead@160:{LN_PN}",
        "compile@160:efficientnet-b0-g1-bn", "reduce-overhead@160:efficientnet-b0-g1-bn",
        "compile@160:efficientnet-b0-g16-gn", "reduce-overhead@160:efficientnet-b0-g16-gn"]
    args = gpu_check.build_parser().parse_args(["throughput", "--parts", "eager", "--channels-last",
                                                "--models", ",".join(models)])
    triton = gpu_check.part_argv("triton", args)
    assert triton[triton.index("--models") + 1] == f"{LN_PN},efficientnet-b0-g16-gn"  # no batch norm
    assert triton[triton.index("--norm-impl") + 1] == "triton,modules" and "--compile" not in triton
    ro = gpu_check.part_argv("reduce-overhead@224:efficientnet-b0-g1-bn", args)
    assert ro[ro.index("--compile-mode") + 1] == "reduce-overhead" and ro[ro.index("--resolutions") + 1] == "224"
    assert ro[ro.index("--timm-models") + 1] == "efficientnet_b0" and "--channels-last" in ro
    eager = gpu_check.part_argv("eager", args)
    assert eager[eager.index("--norm-impl") + 1] == "modules,function" and "--compile" not in eager
    for argv in (triton, ro, eager):  # every part's arguments are ones bench.throughput accepts
        parsed = throughput.build_parser().parse_args(argv)
        assert parsed.batch_size == 256 and parsed.precision == "bf16" and parsed.compare_timm
    with pytest.raises(ValueError, match="unknown part"):
        gpu_check.part_argv("compile@160", args)


def test_fastest_line_is_the_fastest_of_the_model_at_the_resolution(tmp_path: Path) -> None:
    rows = [{"model": f"{LN_PN}[modules]", "resolution": 160, "images_per_s": 10.0, "part": "eager"},
            {"model": "timm:efficientnet_b0", "resolution": 160, "images_per_s": 99.0, "part": "eager"},
            {"model": LN_PN, "resolution": 160, "images_per_s": 30.0, "part": "compile@160", "compile": "default"},
            {"model": LN_PN, "resolution": 224, "images_per_s": 50.0, "part": "compile@224"},
            {"model": "efficientnet-b0-g16-gn", "resolution": 160, "images_per_s": 40.0, "part": "eager"}]
    path = tmp_path / "throughput.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    assert gpu_check.fastest_line(str(path), LN_PN, 160) == rows[2]
    assert gpu_check.fastest_line(str(path), LN_PN, 192) is None
    assert gpu_check.fastest_line(str(tmp_path / "missing.jsonl"), LN_PN, 160) is None
