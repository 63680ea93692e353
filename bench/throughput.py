"""Training throughput of model presets on CPU or CUDA: ``python -m bench.throughput --help``.

Each (model, resolution) runs forward + backward + optimizer step on one synthetic uint8 batch made once on the
device, normalised on the device every step as the trainer does, so the figure is the model's cost, not the data
pipeline's. It prints one JSON line per (model, resolution) with the median images/s over the timed steps (after
warm-up; CUDA is synchronised after each step), peak memory, the activation memory autograd saves, parameters and
MACs per image.

``--norm-impl`` runs every model with each of the given ``model.norm_impl`` values (the plain modules, the
memory-lean autograd Function, the Triton kernels, CUDA only; ``auto`` as resolved for the device); our lines carry
the ``norm_impl`` asked for and the ``norm_units`` the model was built with (``auto`` resolved).

Every configuration is built and warmed up first; then ``--repeats`` rounds each run ``--steps`` timed steps of
every configuration in turn, so a machine shared with other work slows all of them alike. Ratios between two
configurations are the median over rounds of the ratio within a round: ``vs_<other>`` of wall-clock images/s,
``cpu_vs_<other>`` of images per second of process CPU time (all threads), which a busy machine disturbs less
(it still counts cache contention, and the time threads spin at a barrier waiting for a descheduled peer).

Memory, two figures: ``peak_mem_mb`` is CUDA's peak allocated memory, or on a Linux CPU the peak resident set
above the one on entry to the round (freed memory is handed back to the OS first, so each configuration is
measured alone; the maximum over rounds); ``saved_mb`` counts, once, every distinct tensor storage autograd saves
for the backward during one training forward (parameters excluded): the activation memory a model holds at its
peak, exact and the same on every device, where the CPU's resident set also holds allocator caches.

``--compare-timm`` also runs timm's ``efficientnet_b0`` and ``efficientnet_b0_gn`` in the same process at the same
settings (always including ``--timm-resolution``, by default their native 224) and adds to our lines the ratio of
our images/s to theirs: at the same resolution, and against ``efficientnet_b0`` at 224 -- the paper compares ours at
160 with the baseline at 224, since G16 + 160 px reaches the baseline's accuracy. timm is a benchmark-only extra
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from models import ModelConfig, build_model
from models.config import NORM_IMPLS, NormImpl
from models.measure import count_macs
from models.norms import NormImplError, resolve_norm_impl
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
    repeats: int


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


@contextmanager
def saved_tensor_bytes(model: nn.Module) -> Iterator[Dict[str, int]]:
    """Bytes of the distinct storages autograd saves for the backward inside the block, parameters and buffers
    excluded (they are held anyway). Storages are told apart by their data pointer, so a tensor saved by two
    nodes (an output saved by its producer and by the next op) counts once, as it does in memory."""
    held = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: Dict[int, int] = {}
    out = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())


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


@dataclass
class Run:
    """One configuration: its training step, ready to time, and what was measured of it so far."""

    label: str
    resolution: int
    step: Callable[[], None]
    info: Dict[str, Any]
    rounds: List[List[float]]
    cpu_rounds: List[List[float]]
    peak_mem_mb: Optional[float] = None


def training_step(model: nn.Module, resolution: int, in_channels: int, s: Settings) -> Callable[[], None]:
    """A closure running one training step (forward, backward, optimizer) of ``model`` on its own fixed batch."""
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
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return step


def prepare(label: str, model: nn.Module, resolution: int, s: Settings) -> Run:
    """Build the step and warm it up; the first warm-up step also counts the saved activations."""
    params = sum(p.numel() for p in model.parameters())
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    macs = count_macs(model, resolution, in_channels)  # on the CPU, before the model moves
    step = training_step(model, resolution, in_channels, s)
    with saved_tensor_bytes(model) as saved:
        step()
    for _ in range(max(0, s.warmup - 1)):
        step()
    info = {"params": params, "macs": macs, "saved_mb": round(saved["bytes"] / 2**20, 1)}
    return Run(label, resolution, step, info, rounds=[], cpu_rounds=[])


def run_round(run: Run, s: Settings) -> None:
    """``s.steps`` timed steps of one configuration, alone in memory."""
    release(s.device)
    times, cpu_times = [], []
    with peak_memory(s.device) as mem:
        for _ in range(s.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            run.step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    run.rounds.append(times)
    run.cpu_rounds.append(cpu_times)
    if mem["peak_mem_mb"] is not None:
        run.peak_mem_mb = max(run.peak_mem_mb or 0.0, mem["peak_mem_mb"])


def round_ips(rounds: List[List[float]], batch_size: int) -> List[float]:
    """Images per second of each round (its median step), rounded as printed."""
    return [round(batch_size / statistics.median(times), 2) for times in rounds]


def ratio(ours: List[List[float]], theirs: List[List[float]], batch_size: int) -> float:
    """Median over rounds of ours/theirs images per second within the round."""
    return round(statistics.median(a / b for a, b in zip(round_ips(ours, batch_size), round_ips(theirs, batch_size))),
                 3)


def result_line(run: Run, s: Settings) -> Dict:
    """One JSON-ready result line."""
    times = [t for r in run.rounds for t in r]
    median = statistics.median(times)
    return {
        "model": run.label, "resolution": run.resolution, "images_per_s": round(s.batch_size / median, 2),
        "images_per_s_rounds": round_ips(run.rounds, s.batch_size),
        "step_ms_median": round(median * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2),
        "images_per_cpu_s": round(s.batch_size / statistics.median(t for r in run.cpu_rounds for t in r), 2),
        "peak_mem_mb": None if run.peak_mem_mb is None else round(run.peak_mem_mb, 1),
        "mem_kind": "cuda_max_allocated" if s.device.type == "cuda" else "cpu_peak_rss_delta",
        **run.info, "batch_size": s.batch_size, "precision": s.precision,
        "channels_last": s.channels_last, "compile": s.compile_mode if s.compile else False, "optimizer": s.optimizer,
        "steps": s.steps, "warmup": s.warmup, "repeats": s.repeats, "device": device_name(s.device),
        "torch": torch.__version__,
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
    p.add_argument("--norm-impl", type=_csv, default=None, metavar="IMPLS",
                   help=f"comma-separated model.norm_impl values ({', '.join(NORM_IMPLS)}) to run every model with; "
                        "labels get an [impl] suffix (triton: group/layer norm presets only, CUDA). Default: each "
                        "preset's own")
    p.add_argument("--reference", default=None, metavar="LABEL",
                   help="one of our configurations (e.g. efficientnet-b0-g16-gn[function]): every other line gets "
                        "vs_<LABEL> (images/s ratio), mem_vs_<LABEL> and saved_vs_<LABEL> at the same resolution")
    p.add_argument("--resolutions", type=_resolutions, default=[160, 224], help="comma-separated, e.g. 160,224")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32",
                   help="bf16/fp16: autocast (fp16: + loss scaling)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channels-last", action="store_true", help="NHWC model and input")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps: raise --warmup)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs), as train.compile_mode")
    p.add_argument("--optimizer", choices=["rmsprop", "sgd"], default="rmsprop")
    p.add_argument("--compare-timm", action="store_true", help=f"also run timm's {' and '.join(TIMM_MODELS)}")
    p.add_argument("--timm-models", type=_csv, default=list(TIMM_MODELS), metavar="NAMES",
                   help="with --compare-timm: which of them (comma-separated; default both)")
    p.add_argument("--timm-resolution", type=int, default=224,
                   help="resolution of the cross-resolution baseline (adds vs_timm_efficientnet_b0_<this>)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); on a busy machine fewer threads than cores "
                        "avoids oversubscription, which can slow a step tenfold")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the default suits a CPU; use 50+ on a GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds; each times --steps steps of every configuration in turn (interleaved)")
    return p


def our_configs(presets: Dict[str, ModelConfig], names: Sequence[str],
                impls: Sequence[Optional[str]]) -> List[Tuple[str, ModelConfig]]:
    """Every (preset, norm_impl) combination asked for, as (label, model config): ``name`` for the preset's own,
    ``name[impl]`` for an asked ``model.norm_impl``."""
    return [(f"{name}[{impl}]" if impl else name,
             replace(presets[name], norm_impl=cast(NormImpl, impl)) if impl else presets[name])
            for name in names for impl in impls]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.batch_size < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0
            or (args.threads is not None and args.threads < 1)):
        parser.error("--batch-size, --steps, --repeats and --threads must be >= 1, --warmup >= 0")
    impls: List[Optional[str]] = list(args.norm_impl or [None])
    bad = [m for m in impls if m is not None and m not in NORM_IMPLS]
    if bad:
        parser.error(f"--norm-impl {bad[0]!r} is not one of {', '.join(NORM_IMPLS)}")
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
                        args.optimizer, args.steps, args.warmup, args.repeats)
    try:
        presets = {name: load_preset(name) for name in args.models}  # every name checked before any timing
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if "triton" in impls:
        batch = [name for name in args.models if presets[name].norm == "batch"]
        if batch:
            parser.error(f"--norm-impl triton: {batch[0]} uses batch norm; the fused kernels cover group and layer "
                         "norm only (leave batch-norm presets out of that run)")
    ours = our_configs(presets, args.models, impls)
    try:  # every norm_impl checked for the device before any timing
        units = {label: resolve_norm_impl(cfg.norm_impl, cfg.norm, device.type, args.compile) for label, cfg in ours}
    except NormImplError as err:
        parser.error(str(err))
    if args.reference is not None and args.reference not in [label for label, _ in ours]:
        parser.error(f"--reference {args.reference!r} is not one of the configurations: "
                     f"{', '.join(label for label, _ in ours)}")
    bad = [name for name in args.timm_models if name not in TIMM_MODELS]
    if bad or not args.timm_models:
        parser.error(f"--timm-models {','.join(bad)!r}: choose from {', '.join(TIMM_MODELS)}")
    timm_runs: Dict[str, Run] = {}
    if args.compare_timm:
        for name in args.timm_models:
            for res in sorted(set(args.resolutions) | {args.timm_resolution}):
                torch.manual_seed(0)
                timm_runs[f"{name}@{res}"] = prepare(f"timm:{name}", build_timm(name), res, settings)
    our_runs: Dict[str, Run] = {}
    for label, cfg in ours:
        for res in args.resolutions:
            torch.manual_seed(0)
            model = build_model(cfg, device.type, args.compile)
            our_runs[f"{label}@{res}"] = prepare(label, model, res, settings)
            our_runs[f"{label}@{res}"].info.update(norm_impl=cfg.norm_impl, norm_units=units[label])
    for _ in range(args.repeats):
        for run in list(timm_runs.values()) + list(our_runs.values()):
            run_round(run, settings)

    for run in timm_runs.values():
        print(json.dumps(result_line(run, settings)), flush=True)
    for run in our_runs.values():
        peers = {f"timm_{name}": timm_runs[f"{name}@{run.resolution}"] for name in args.timm_models if timm_runs}
        if f"efficientnet_b0@{args.timm_resolution}" in timm_runs:
            peers[f"timm_efficientnet_b0_{args.timm_resolution}"] = timm_runs[f"efficientnet_b0@{args.timm_resolution}"]
        ref = our_runs.get(f"{args.reference}@{run.resolution}")
        print(json.dumps(compared_line(run, peers, (args.reference, ref) if ref is not None else None, settings)),
              flush=True)
    return 0


def compared_line(run: Run, peers: Dict[str, Run], reference: Optional[Tuple[str, Run]], s: Settings) -> Dict:
    """``run``'s result line with its speed ratios to each peer and, against ``reference`` (label, run) unless
    that is ``run`` itself, its speed and memory ratios."""
    line = result_line(run, s)
    if reference is not None and reference[1] is not run:
        label, ref = reference
        peers = {**peers, label: ref}
        if run.peak_mem_mb and ref.peak_mem_mb:
            line[f"mem_vs_{label}"] = round(run.peak_mem_mb / ref.peak_mem_mb, 3)
        if ref.info["saved_mb"]:
            line[f"saved_vs_{label}"] = round(run.info["saved_mb"] / ref.info["saved_mb"], 3)
    for name, peer in peers.items():
        line[f"vs_{name}"] = ratio(run.rounds, peer.rounds, s.batch_size)
        line[f"cpu_vs_{name}"] = ratio(run.cpu_rounds, peer.cpu_rounds, s.batch_size)
    return line


if __name__ == "__main__":
    sys.exit(main())
