"""Training throughput of model presets on CPU or CUDA: ``python -m bench.throughput --help``.

Each (model, resolution) runs forward + backward + optimizer step on one synthetic uint8 batch made once on the
device, normalised on the device every step as the trainer does, so the figure is the model's cost, not the data
pipeline's. It prints one JSON line per (model, resolution) with the median images/s over the timed steps (after
warm-up; CUDA is synchronised after each step), peak memory, parameters and MACs per image.

``--compare-timm`` also runs timm's ``efficientnet_b0`` and ``efficientnet_b0_gn`` in the same process at the same
settings (always including ``--timm-resolution``, by default their native 224) and adds to our lines the ratio of our images/s to
theirs: at the same resolution, and against ``efficientnet_b0`` at 224 -- the paper compares ours at 160 with the
baseline at 224, since G16 + 160 px reaches the baseline's accuracy. timm is a benchmark-only extra
(requirements-bench.txt).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import ModelConfig, build_model
from models.summary import count_macs
from train.config import ConfigError, load_config

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
TIMM_MODELS = ("efficientnet_b0", "efficientnet_b0_gn")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Settings:
    device: torch.device
    precision: str
    batch_size: int
    channels_last: bool
    compile: bool
    compile_mode: str
    optimizer: str
    steps: int
    warmup: int


# ------------------------------------------------------------------------------------------------ models
def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yml"))


def load_preset(name: str) -> ModelConfig:
    """The model section of ``configs/models/<name>.yml``."""
    path = PRESETS_DIR / f"{name}.yml"
    if not path.is_file():
        raise ConfigError(f"no model preset {name!r} in {PRESETS_DIR} (available: {', '.join(preset_names())})")
    return load_config(str(path)).model


def build_timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise SystemExit("--compare-timm needs timm, a benchmark-only extra: "
                         "pip install -r requirements-bench.txt -c constraints.txt") from None
    # drop_path_rate 0.2 is timm's recipe and matches our survival_prob 0.8: both pay for stochastic depth.
    return timm.create_model(name, pretrained=False, num_classes=1000, drop_rate=0.2, drop_path_rate=0.2)


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} missing from /proc/self/status")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Dict[str, Optional[float]]]:
    """Peak memory of the enclosed work, in MiB: CUDA's peak allocated tensor memory, or on Linux CPUs the peak
    resident set size above the one on entry (the high-water mark is reset through ``/proc/self/clear_refs``,
    so each configuration is measured alone). None where neither is available."""
    out: Dict[str, Optional[float]] = {"peak_mem_mb": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        start_kb = _proc_status_kb("VmRSS")
    except OSError:
        yield out
        return
    yield out
    out["peak_mem_mb"] = (_proc_status_kb("VmHWM") - start_kb) / 1024


# ------------------------------------------------------------------------------------------------- timing
def grad_scaler(enabled: bool) -> Any:
    """fp16 loss scaling; ``torch.amp.GradScaler`` is torch >= 2.3, the older spelling is kept for torch 2.0."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    # Stands in for the trainer's RMSpropTF: the same two buffers and similar arithmetic per parameter, and the
    # same for every model, so the ratios between models hold; this measures models, not optimizer kernels.
    return torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5)


def time_training(model: nn.Module, resolution: int, in_channels: int, s: Settings) -> List[float]:
    """Seconds of each timed training step (warm-up steps excluded)."""
    dev = s.device
    memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format).train()
    optimizer = make_optimizer(s.optimizer, model)
    step_model: Callable[[torch.Tensor], torch.Tensor] = (
        torch.compile(model, mode=s.compile_mode) if s.compile else model)
    scaler = grad_scaler(s.precision == "fp16")
    gen = torch.Generator(device=dev).manual_seed(0)
    images = torch.randint(0, 256, (s.batch_size, in_channels, resolution, resolution), dtype=torch.uint8,
                           device=dev, generator=gen).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (s.batch_size,), device=dev, generator=gen)

    def step() -> None:
        x = (images.float() - 127.5) / 64.0  # the trainer's per-channel normalisation costs the same
        # torch 2.0 rejects autocast(dtype=float32) even when disabled, hence no autocast at all for fp32
        with torch.autocast(dev.type, dtype=DTYPES[s.precision]) if s.precision != "fp32" else nullcontext():
            loss = F.cross_entropy(step_model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    times = []
    for i in range(s.warmup + s.steps):
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= s.warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(label: str, model: nn.Module, resolution: int, s: Settings) -> Dict:
    """One JSON-ready result line."""
    params = sum(p.numel() for p in model.parameters())
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    macs = count_macs(model, resolution, in_channels)  # on the CPU, before the model moves
    with peak_memory(s.device) as mem:
        times = time_training(model, resolution, in_channels, s)
    median = statistics.median(times)
    return {
        "model": label, "resolution": resolution, "images_per_s": round(s.batch_size / median, 2),
        "step_ms_median": round(median * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2),
        "peak_mem_mb": None if mem["peak_mem_mb"] is None else round(mem["peak_mem_mb"], 1),
        "mem_kind": "cuda_max_allocated" if s.device.type == "cuda" else "cpu_peak_rss_delta",
        "params": params, "macs": macs, "batch_size": s.batch_size, "precision": s.precision,
        "channels_last": s.channels_last, "compile": s.compile_mode if s.compile else False, "optimizer": s.optimizer,
        "steps": s.steps, "warmup": s.warmup, "device": device_name(s.device), "torch": torch.__version__,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def release(device: torch.device) -> None:
    """Free the last configuration's memory so the next one is measured alone: on CPUs glibc keeps freed memory
    resident, where the next configuration would reuse it unseen by the peak-RSS measure, unless trimmed."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the CPU memory figures may undercount later configurations
        pass


# ---------------------------------------------------------------------------------------------------- CLI
def _csv(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _resolutions(text: str) -> List[int]:
    try:
        values = [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 32:
        raise argparse.ArgumentTypeError(f"{text!r}: need at least one resolution, each >= 32")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", type=_csv, default=["efficientnet-b0-g16-ln-pn", "efficientnet-b0-g1-bn"],
                   help="comma-separated presets from configs/models/ (file names without .yml)")
    p.add_argument("--resolutions", type=_resolutions, default=[160, 224], help="comma-separated, e.g. 160,224")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32", help="bf16/fp16: autocast (fp16: + loss scaling)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channels-last", action="store_true", help="NHWC model and input")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps: raise --warmup)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs), as train.compile_mode")
    p.add_argument("--optimizer", choices=["rmsprop", "sgd"], default="rmsprop")
    p.add_argument("--compare-timm", action="store_true", help=f"also run timm's {' and '.join(TIMM_MODELS)}")
    p.add_argument("--timm-resolution", type=int, default=224,
                   help="resolution of the cross-resolution baseline (adds vs_timm_efficientnet_b0_<this>)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); on a busy machine fewer threads than cores "
                        "avoids oversubscription, which can slow a step tenfold")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the default suits a CPU; use 50+ on a GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--batch-size, --steps and --threads must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} needs --compile")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    if device.type == "cpu" and args.precision == "fp16":
        parser.error("--precision fp16 needs --device cuda (CPU autocast in torch 2.0 is bf16 only); use bf16")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # same for every model, so the ratios stay fair
    settings = Settings(device, args.precision, args.batch_size, args.channels_last, args.compile, args.compile_mode,
                        args.optimizer, args.steps, args.warmup)
    try:
        presets = {name: load_preset(name) for name in args.models}  # every name checked before any timing
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    baseline: Dict[str, float] = {}
    if args.compare_timm:
        timm_resolutions = sorted(set(args.resolutions) | {args.timm_resolution})
        for name in TIMM_MODELS:
            for res in timm_resolutions:
                torch.manual_seed(0)
                line = measure(f"timm:{name}", build_timm(name), res, settings)
                baseline[f"{name}@{res}"] = line["images_per_s"]
                print(json.dumps(line), flush=True)
                release(device)

    for name in args.models:
        for res in args.resolutions:
            torch.manual_seed(0)
            line = measure(name, build_model(presets[name]), res, settings)
            if baseline:
                for timm_name in TIMM_MODELS:
                    line[f"vs_timm_{timm_name}"] = round(line["images_per_s"] / baseline[f"{timm_name}@{res}"], 3)
                cross = baseline[f"efficientnet_b0@{args.timm_resolution}"]
                line[f"vs_timm_efficientnet_b0_{args.timm_resolution}"] = round(line["images_per_s"] / cross, 3)
            print(json.dumps(line), flush=True)
            release(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
