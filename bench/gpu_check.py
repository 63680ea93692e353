"""The Python side of ``bench/gpu_check.sh`` (docs/benchmarks.md): ``python -m bench.gpu_check COMMAND``.

Commands (``env``, ``throughput``, ``profile``):

- ``env``: one JSON line: GPU, driver, CUDA runtime, cuDNN, torch, Triton and timm versions, the commit.
- ``throughput``: runs ``bench.throughput`` once per *part* in this process, in the order given, and prints each
  part's lines as soon as the part ends, tagged ``"part": NAME`` (so a run cut short keeps the parts it finished).
  A part that fails is recorded and the next one runs. Parts: ``eager`` (every model on the plain modules and on
  the norm Function, timm eager), ``triton`` (the group/layer-norm models on the Triton kernels next to the same
  models on the modules), and ``<mode>@<res>:<model>`` with ``<mode>`` ``compile`` (``torch.compile``) or
  ``reduce-overhead`` (``torch.compile`` replaying CUDA graphs): one model at one resolution compiled, with its
  timm peers compiled the same way (``efficientnet_b0`` for BatchNorm presets, ``efficientnet_b0_gn`` for
  group/layer-norm ones, both for the LN+PN model), so that each compile costs time in priority order.
  With ``--record FILE`` it appends ``{"what": "plan"}`` once and ``{"what": "part"}`` lines (started, then ok or
  failed) to FILE, the script's ``steps.jsonl``.
- ``profile``: a ``torch.profiler`` table of one preset's training step (default B0-G16-LN+PN) on the eager path and
  on the fastest path that ``bench.throughput`` measured for that preset at that resolution (``--fastest-from``):
  the top kernels by device time (on a CPU, the top ops by self CPU time), as JSON lines and as profiler tables.

Torch and the project are imported once, at the top, inside one guard: where that import fails, ``env`` still
reports the machine (driver, versions, the commit) with the import's error, and the other commands stop with it.
timm and Triton are optional and imported where a part needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import io
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    import torch
    from torch import nn
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench import throughput
    from models import build_model, fused_norm
except Exception as _exc:  # noqa: BLE001 - `env` reports any import failure instead of crashing
    IMPORT_ERROR: Optional[str] = "".join(traceback.format_exception_only(type(_exc), _exc)).strip()[-2000:]
else:
    IMPORT_ERROR = None

ROOT = Path(__file__).resolve().parents[1]
LN_PN = "efficientnet-b0-g16-ln-pn"
COMPILE_MODES = {"compile": "default", "reduce-overhead": "reduce-overhead"}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _emit(line: Dict[str, Any], file: Any = None) -> None:
    print(json.dumps(line), file=file or sys.stdout, flush=True)


def _record(path: Optional[str], line: Dict[str, Any]) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**line, "time": _now()}) + "\n")


def _error_text(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text[-2000:]


# ---------------------------------------------------------------------------------------------------------- env
def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: Sequence[str]) -> Optional[str]:
    try:
        done = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def nvidia_driver() -> Optional[str]:
    """The NVIDIA kernel driver's version: from nvidia-smi, else from /proc/driver/nvidia/version."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    words = text.split()
    return next((w for w in words if w[:1].isdigit() and w.count(".") >= 1), None)


def env_line() -> Dict[str, Any]:
    line: Dict[str, Any] = {
        "what": "env", "time": _now(), "host": platform.node(), "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "driver": nvidia_driver(),
        "triton": _version("triton") or _version("pytorch-triton"), "timm": _version("timm"),
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
    }
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    line["git_dirty"] = None if status is None else bool(status)
    if IMPORT_ERROR is not None:
        line["error"] = IMPORT_ERROR
        return line
    try:
        line.update(torch=torch.__version__, cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                    cuda_available=torch.cuda.is_available(), gpus=[])
        if torch.cuda.is_available():
            get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
            line["cuda_driver_api"] = get_driver() if get_driver is not None else None
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                line["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                     "memory_gib": round(p.total_memory / 2**30, 1),
                                     "multiprocessors": p.multi_processor_count})
        line["triton_error"] = fused_norm.triton_error()
    except Exception as exc:  # report what was found, and why the rest is missing
        line["error"] = _error_text(exc)
    return line


# --------------------------------------------------------------------------------------------------- throughput
def timm_peers(model: str) -> List[str]:
    """The timm models a compiled preset is compared with: the same kind of normalisation, and for the LN+PN model
    (the paper's) also the BatchNorm baseline."""
    if model == LN_PN:
        return ["efficientnet_b0", "efficientnet_b0_gn"]
    return ["efficientnet_b0"] if "-bn" in model else ["efficientnet_b0_gn"]


def part_argv(part: str, args: argparse.Namespace) -> List[str]:
    """The ``bench.throughput`` arguments of one part."""
    common = ["--device", args.device, "--precision", args.precision, "--batch-size", str(args.batch_size),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
              "--optimizer", args.optimizer]
    if args.channels_last:
        common.append("--channels-last")
    if args.threads:
        common += ["--threads", str(args.threads)]
    res = ",".join(str(r) for r in args.resolutions)
    top = str(max(args.resolutions))
    if part == "eager":
        return common + ["--models", ",".join(args.models), "--resolutions", res, "--norm-impl",
                         "modules,function", "--compare-timm", "--timm-resolution", top]
    if part == "triton":
        models = [m for m in args.models if "-bn" not in m]
        return common + ["--models", ",".join(models), "--resolutions", res, "--norm-impl", "triton,modules",
                         "--compare-timm", "--timm-resolution", top]
    mode, _, rest = part.partition("@")
    resolution, _, model = rest.partition(":")
    if mode not in COMPILE_MODES or not resolution.isdigit() or not model:
        raise ValueError(f"unknown part {part!r}: expected eager, triton or <compile|reduce-overhead>@<res>:<model>")
    return common + ["--models", model, "--resolutions", resolution, "--compile", "--compile-mode",
                     COMPILE_MODES[mode], "--compare-timm", "--timm-models", ",".join(timm_peers(model)),
                     "--timm-resolution", resolution]


def compile_parts(models: Sequence[str], resolutions: Sequence[int]) -> List[str]:
    """The compiled parts in priority order: the training resolution first, each model's plain compile then its
    CUDA-graph replay, the LN+PN model first."""
    ordered = sorted(models, key=lambda m: m != LN_PN)
    return [f"{mode}@{res}:{model}" for res in resolutions for model in ordered for mode in COMPILE_MODES]


def release() -> None:
    gc.collect()
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and hasattr(dynamo, "reset"):
        dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Tee(io.StringIO):
    """Keeps what is written and passes it on at once (a part's messages reach the log even if it is killed)."""

    def __init__(self, stream: Any):
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.stream.flush()
        return super().write(text)

    def text(self) -> str:
        return self.getvalue().strip()[-2000:]


def run_part(part: str, args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """One part: its result lines, and the error (None when it ran to the end)."""
    argv = part_argv(part, args)
    out, err = io.StringIO(), _Tee(sys.stderr)
    error = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = throughput.main(argv)
        if rc:
            error = f"bench.throughput exited {rc}: {err.text()}"
    except SystemExit as exc:  # argparse usage errors
        error = f"bench.throughput exited {exc.code}: {err.text()}"
    except Exception as exc:
        error = _error_text(exc)
        traceback.print_exc(file=sys.stderr)
    finally:
        release()
    lines = [dict(json.loads(text), part=part) for text in out.getvalue().splitlines() if text.startswith("{")]
    return lines, error


def throughput_main(args: argparse.Namespace) -> int:
    parts = [p for part in args.parts
             for p in (compile_parts(args.models, args.resolutions) if part == "compile-all" else [part])]
    for part in parts:
        part_argv(part, args)  # every part's name checked before anything runs
    _record(args.record, {"what": "plan", "step": args.step, "parts": parts})
    failed = 0
    for part in parts:
        _record(args.record, {"what": "part", "step": args.step, "part": part, "status": "started"})
        print(f"gpu_check: part {part} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        lines, error = run_part(part, args)
        for line in lines:
            _emit(line)
        seconds = round(time.perf_counter() - start, 1)
        status = "failed" if error else "ok"
        failed += bool(error)
        _record(args.record, {"what": "part", "step": args.step, "part": part, "status": status,
                              "seconds": seconds, "lines": len(lines), "error": error,
                              "command": "python -m bench.throughput " + " ".join(part_argv(part, args))})
        print(f"gpu_check: part {part}: {status} in {seconds} s ({len(lines)} lines)", file=sys.stderr, flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------ profile
def _label_model(label: str) -> str:
    return label.split("[", 1)[0]


def fastest_line(path: str, model: str, resolution: int) -> Optional[Dict[str, Any]]:
    """The fastest of our ``model`` lines at ``resolution`` in a bench.throughput JSON-lines file (lines from
    different parts are compared by their images/s: good enough to pick what to profile)."""
    best = None
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if (isinstance(line, dict) and _label_model(str(line.get("model", ""))) == model
                and line.get("resolution") == resolution and isinstance(line.get("images_per_s"), (int, float))
                and (best is None or line["images_per_s"] > best["images_per_s"])):
            best = line
    return best


def _time_of(evt: Any, device: bool) -> float:
    names = ("self_device_time_total", "self_cuda_time_total") if device else ("self_cpu_time_total",)
    for name in names:
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _table(prof: Any, device: bool, top: int) -> str:
    keys = ("self_device_time_total", "self_cuda_time_total") if device else ("self_cpu_time_total",)
    for key in keys:
        try:
            return str(prof.key_averages().table(sort_by=key, row_limit=top))
        except (AttributeError, KeyError, ValueError):
            continue
    return ""


def profile_path(name: str, path: Dict[str, Any], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Warm one path up, profile ``args.steps`` training steps, return its lines (and write its table)."""
    began = time.perf_counter()
    device = torch.device(args.device)
    cfg = throughput.load_preset(args.model)
    if path["norm_impl"]:
        cfg = replace(cfg, norm_impl=path["norm_impl"])
    compile_mode = path["compile"]
    settings = throughput.Settings(device, args.precision, args.batch_size, args.channels_last, bool(compile_mode),
                                   compile_mode or "default", "rmsprop", args.steps, args.warmup, 1)
    torch.manual_seed(0)
    model = build_model(cfg, device.type, bool(compile_mode))
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    step = throughput.training_step(model, args.resolution, in_channels, settings)
    for _ in range(max(1, args.warmup)):
        step()
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - start) / args.steps
    events = [e for e in prof.key_averages()
              if (getattr(e, "device_type", None) == DeviceType.CUDA) == on_gpu and _time_of(e, on_gpu) > 0]
    events.sort(key=lambda e: _time_of(e, on_gpu), reverse=True)
    total = sum(_time_of(e, on_gpu) for e in events)
    lines: List[Dict[str, Any]] = [{
        "what": "profile_total", "path": name, "model": args.model, "resolution": args.resolution,
        "batch_size": args.batch_size, "precision": args.precision, "channels_last": args.channels_last,
        "norm_impl": cfg.norm_impl, "norm_units": model.norm_impl, "compile": compile_mode or False,
        "device": throughput.device_name(device), "time_kind": "cuda_kernels" if on_gpu else "cpu_ops",
        "steps": args.steps, "step_ms": round(wall * 1e3, 2), "self_ms_per_step": round(total / 1e3 / args.steps, 3),
        "distinct": len(events), "seconds": round(time.perf_counter() - began, 1), "torch": torch.__version__}]
    for rank, evt in enumerate(events[:args.top], 1):
        t = _time_of(evt, on_gpu)
        lines.append({"what": "profile", "path": name, "rank": rank, "name": str(evt.key)[:300],
                      "self_ms_per_step": round(t / 1e3 / args.steps, 3),
                      "calls_per_step": round(evt.count / args.steps, 2), "share": round(t / total, 4) if total else 0})
    if args.table_dir:
        Path(args.table_dir, f"profile-{name}.txt").write_text(_table(prof, on_gpu, args.top) + "\n")
    del step, model
    release()
    return lines


def profile_main(args: argparse.Namespace) -> int:
    eager = {"norm_impl": None, "compile": False}  # the preset as it is: today's default
    paths: List[Tuple[str, Dict[str, Any]]] = [("eager", eager)]
    fastest = fastest_line(args.fastest_from, args.model, args.resolution) if args.fastest_from else None
    if fastest is None:
        _emit({"what": "profile_skipped", "path": "fastest", "reason":
               f"no {args.model} line at {args.resolution} px in {args.fastest_from or '(no --fastest-from)'}"})
    else:
        path = {k: fastest.get(k) for k in ("norm_impl", "compile")}
        path["compile"] = path["compile"] or False
        if path["compile"] is True:  # bench.throughput writes the mode; keep older lines working
            path["compile"] = "default"
        _emit({"what": "profile_fastest", "label": fastest["model"], "part": fastest.get("part"),
               "images_per_s": fastest["images_per_s"], **path})
        paths.insert(0, ("fastest", path))
    failed = 0
    for name, path in paths:
        try:
            for line in profile_path(name, path, args):
                _emit(line)
        except Exception as exc:
            failed += 1
            traceback.print_exc(file=sys.stderr)
            _emit({"what": "profile_error", "path": name, "error": _error_text(exc)})
            release()
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------- CLI
def _csv(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> List[int]:
    return [int(x) for x in _csv(text)]


def _settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (the dry run's 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="one JSON line: GPU, driver, CUDA, torch, Triton, timm versions")
    t = sub.add_parser("throughput", help="bench.throughput part by part, each part's lines as it ends")
    t.add_argument("--parts", type=_csv, required=True,
                   help="comma-separated: eager, triton, <compile|reduce-overhead>@<res>:<model>, or compile-all "
                        "(every compiled part of --models x --resolutions, in priority order)")
    t.add_argument("--models", type=_csv, default=[LN_PN, "efficientnet-b0-g16-gn", "efficientnet-b0-g1-bn"])
    t.add_argument("--resolutions", type=_ints, default=[160, 224])
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--optimizer", default="rmsprop")
    t.add_argument("--record", default=None, help="append plan and part lines to this file (steps.jsonl)")
    t.add_argument("--step", default="throughput", help="the step name in the record lines")
    _settings(t)
    f = sub.add_parser("profile", help="torch.profiler table of one training step, eager and fastest path")
    f.add_argument("--model", default=LN_PN)
    f.add_argument("--resolution", type=int, default=160)
    f.add_argument("--fastest-from", default=None, help="bench.throughput JSON lines to pick the fastest path from")
    f.add_argument("--top", type=int, default=15)
    f.add_argument("--table-dir", default=None, help="write profile-<path>.txt (the profiler's table) here")
    _settings(f)
    f.set_defaults(steps=1)  # one training step profiled, after --warmup
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "env":
        _emit(env_line())
        return 0
    if IMPORT_ERROR is not None:
        print(f"bench.gpu_check {args.command}: torch or the project does not import: {IMPORT_ERROR}",
              file=sys.stderr)
        return 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "throughput":
        return throughput_main(args)
    return profile_main(args)


if __name__ == "__main__":
    sys.exit(main())
