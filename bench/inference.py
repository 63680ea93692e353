"""Inference speed of model presets, checkpoints and exports: ``python -m bench.inference --help``.

The models: presets from configs/models/ (``--models``, random weights: speed does not depend on them), or your
own trained ones, ``--checkpoint PATH`` and ``--model FILE`` (a safetensors export), each repeatable, timed with
their own architecture and weights at their own eval resolution unless ``--resolution`` says otherwise. For each
model and batch size, one process times the engines side by side: ``eager`` (the training form in eval
mode, what validation runs), ``folded`` (the inference form of models/folding.py: proxy norm frozen, BatchNorm
and proxy-norm affines folded), ``compile`` (``torch.compile`` of the folded form), ``onnxruntime`` (the folded form
exported as train.export does, in ONNX Runtime) and, with ``--compare-timm``, timm's ``efficientnet_b0`` and
``efficientnet_b0_gn`` in eager mode. The input is one normalised float batch made once on the device.

Machines shared with other work make absolute times drift, so the engines are interleaved: ``--rounds`` rounds,
each timing every engine for ``--iters`` calls in turn, and every ratio is taken within a round, then the median
over rounds. Batch 1 reports latency (ms per call), larger batches throughput (images/s). One JSON line per
(preset, engine, batch): its median ms per call, images/s, and ``vs_*`` ratios of images/s (ours / theirs).

``--ipu-config RECIPE`` instead compiles the recipe's inference model (the folded form with its validation
options) for an offline IPU and reports the compile time: it needs PopTorch, not an IPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from bench.throughput import DTYPES, _csv, build_timm, device_name, load_preset, preset_names
from models import EfficientNet, ExportError, ModelConfig, inference_form, load_exported
from train.cli import run_guarded
from train.config import ConfigError, load_config
from train.export import ONNX_OPSET, Trained, default_resolution, export_onnx, ipu_inference, load_trained
from train.phases import run_phases

ENGINES = ("eager", "folded", "compile", "onnxruntime")
DEFAULT_PRESETS = ("efficientnet-b0-g16-ln-pn", "efficientnet-b0-g1-bn")
TIMM_MODELS = ("efficientnet_b0", "efficientnet_b0_gn")


@dataclass
class Engine:
    """One way of running one model: ``run()`` does one forward pass of the prepared batch."""

    model: str
    engine: str
    run: Callable[[], object]
    times: List[List[float]] = field(default_factory=list)  # per round, seconds per call

    @property
    def label(self) -> str:
        return f"{self.model}/{self.engine}"


@dataclass
class Measured:
    """A model to time: a name for the report, its config, its training-form network in eval mode, and the input
    size it runs at by default (a file's eval resolution; None for a preset: ``--resolution``'s default)."""

    name: str
    config: ModelConfig
    network: EfficientNet
    resolution: Optional[int] = None


def preset_model(name: str) -> Measured:
    cfg = load_preset(name)
    torch.manual_seed(0)
    return Measured(name, cfg, EfficientNet(cfg).eval())


def checkpoint_model(path: Path) -> Measured:
    """A checkpoint's network with the weights predict and export take (the average, if the run kept one)."""
    trained = load_trained(path, [])
    return Measured(path.name, trained.cfg.model, trained.network, default_resolution(trained))


def export_model(path: Path) -> Measured:
    """A safetensors export's network, rebuilt in its training form (the engines fold it themselves)."""
    if path.suffix.lower() == ".onnx":
        raise ConfigError(f"--model {path}: bench.inference times the PyTorch forms and exports ONNX itself; pass "
                          "the checkpoint or the safetensors export of this model")
    try:
        exported = load_exported(path, form="training")
    except ExportError as err:
        raise ConfigError(f"--model {err}") from None
    return Measured(path.name, exported.config, exported.network.eval(), exported.preprocessing.resolution)


def _torch_engine(model: Callable[[torch.Tensor], object], x: torch.Tensor, precision: str) -> Callable[[], object]:
    autocast = (torch.autocast(x.device.type, dtype=DTYPES[precision]) if precision != "fp32" else nullcontext())

    def run() -> object:
        with torch.no_grad(), autocast:
            out = model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return out

    return run


def _onnx_engine(network: EfficientNet, model_cfg: ModelConfig, name: str, x: torch.Tensor,
                 folder: Path) -> Callable[[], object]:
    """The folded network exported as ``python -m train.export --input float`` does, in ONNX Runtime."""
    import onnxruntime as ort

    cfg = dataclasses.replace(load_config(None, []), model=model_cfg)
    path = folder / f"{name}.onnx"
    export_onnx(Trained(cfg, network, "raw", path, "train", 0), path, [str(i) for i in range(cfg.model.num_classes)],
                int(x.shape[-1]), "float", ONNX_OPSET)
    providers = (["CUDAExecutionProvider"] if x.device.type == "cuda" else []) + ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    if x.device.type == "cpu":
        options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch gets
    session = ort.InferenceSession(str(path), options, providers=providers)
    feed = {"images": x.float().cpu().numpy()}
    return lambda: session.run(None, feed)


def build_engines(measured: Measured, engines: Sequence[str], x: torch.Tensor, precision: str,
                  folder: Path) -> List[Engine]:
    name, model_cfg = measured.name, measured.config
    network = copy.deepcopy(measured.network)  # each batch size starts from the same weights on the CPU
    folded = inference_form(network).to(x.device)
    out: List[Engine] = []
    for engine in engines:
        if engine == "eager":
            out.append(Engine(name, engine, _torch_engine(network.to(x.device), x, precision)))
        elif engine == "folded":
            out.append(Engine(name, engine, _torch_engine(folded, x, precision)))
        elif engine == "compile":
            out.append(Engine(name, engine, _torch_engine(torch.compile(folded), x, precision)))
        elif precision == "fp32":  # onnxruntime: the exported graph is fp32
            # A copy: the eager engine keeps using ``network`` on its device.
            out.append(Engine(name, engine, _onnx_engine(copy.deepcopy(network).cpu(), model_cfg, name, x, folder)))
    return out


def time_rounds(engines: List[Engine], rounds: int, iters: int, warmup: int) -> None:
    for engine in engines:
        for _ in range(warmup):
            engine.run()
    for _ in range(rounds):
        for engine in engines:  # interleaved: every engine sees the same machine load in each round
            samples = []
            for _ in range(iters):
                start = time.perf_counter()
                engine.run()
                samples.append(time.perf_counter() - start)
            engine.times.append(samples)


def _round_medians(engine: Engine) -> List[float]:
    return [statistics.median(samples) for samples in engine.times]


def ratio(ours: Engine, theirs: Engine) -> float:
    """Median over rounds of (their time / our time) within the round: our speed-up, > 1 = we are faster."""
    return statistics.median(t / o for o, t in zip(_round_medians(ours), _round_medians(theirs), strict=True))


def report(engines: List[Engine], batch: int, resolution: int, precision: str, device: torch.device) -> List[Dict]:
    by_label = {e.label: e for e in engines}
    lines = []
    for e in engines:
        ms = statistics.median(t for samples in e.times for t in samples) * 1e3
        line: Dict[str, object] = {"model": e.model, "engine": e.engine, "batch_size": batch, "resolution": resolution,
                                   "precision": precision, "ms_per_call": round(ms, 3),
                                   "images_per_s": round(batch / ms * 1e3, 2)}
        if batch == 1:
            line["latency_ms"] = round(ms, 3)
        if not e.model.startswith("timm:"):
            for other in ("eager", "folded"):
                if other != e.engine and f"{e.model}/{other}" in by_label:
                    line[f"vs_{other}"] = round(ratio(e, by_label[f"{e.model}/{other}"]), 3)
            for timm_name in TIMM_MODELS:
                if f"timm:{timm_name}/eager" in by_label:
                    line[f"vs_timm_{timm_name}"] = round(ratio(e, by_label[f"timm:{timm_name}/eager"]), 3)
        line.update({"rounds": len(e.times), "iters": len(e.times[0]), "device": device_name(device),
                     "torch": torch.__version__})
        lines.append(line)
    return lines


def compile_ipu(recipe: str, overrides: List[str], resolution: Optional[int]) -> Dict[str, object]:
    """Compile a recipe's inference model for an offline IPU (random weights) and time it."""
    cfg = load_config(recipe, overrides)
    phase = run_phases(cfg)[-1]
    res = resolution or max(phase.val_resolutions)
    ipu = ipu_inference(cfg, phase, EfficientNet(cfg.model), res)
    start = time.perf_counter()
    ipu.executor.compile(ipu.images)
    return {"engine": "ipu", "recipe": recipe, "phase": phase.name, "resolution": res, "compiled": True,
            "compile_s": round(time.perf_counter() - start, 1), "batch_per_call": len(ipu.images),
            "precision": ipu.plan.precision, "ipus_per_replica": ipu.plan.ipus_per_replica}


# ---------------------------------------------------------------------------------------------------- CLI
def _batch_sizes(text: str) -> List[int]:
    items = _csv(text)
    if not items or not all(x.isdigit() and int(x) >= 1 for x in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes >= 1")
    return [int(x) for x in items]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", type=_csv,
                   help=f"comma-separated presets from configs/models/ (e.g. {', '.join(preset_names()[:2])}); "
                        f"default: {', '.join(DEFAULT_PRESETS)} when no --checkpoint or --model is given")
    p.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="a checkpoint of this tool: its model and weights (repeatable)")
    p.add_argument("--model", type=Path, action="append", default=[],
                   help="a safetensors file written by train.export (repeatable)")
    p.add_argument("--engines", type=_csv, default=list(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--resolution", type=int,
                   help="input size; default: the first --checkpoint's or --model's eval resolution, else 224")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 64, 256],
                   help="1 measures latency, larger ones throughput")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32", help="bf16/fp16: autocast (CUDA)")
    p.add_argument("--compare-timm", action="store_true", help=f"also run timm's {' and '.join(TIMM_MODELS)}")
    p.add_argument("--threads", type=int, help="torch (and ONNX Runtime) CPU threads; default: torch's choice")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the engines")
    p.add_argument("--iters", type=int, default=3, help="timed calls per engine and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per engine first (compile: raise it)")
    p.add_argument("--ipu-config", metavar="RECIPE",
                   help="compile this recipe's inference model for an offline IPU instead (needs PopTorch)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="--ipu-config: override a config value")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ipu_config:
        return run_guarded(lambda: print(json.dumps(compile_ipu(args.ipu_config, args.overrides, args.resolution)),
                                         flush=True))
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        parser.error(f"--engines: {', '.join(unknown)} not among {', '.join(ENGINES)}")
    if min(args.rounds, args.iters) < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--rounds, --iters and --threads must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    if device.type == "cpu" and args.precision == "fp16":
        parser.error("--precision fp16 needs --device cuda; use bf16")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run_guarded(lambda: measure(args, device))


def measure(args: argparse.Namespace, device: torch.device) -> None:
    """Load every model first (a bad file is one line before anything is timed), then time them per batch size."""
    presets = args.models if args.models is not None else ([] if args.checkpoint or args.model else
                                                           list(DEFAULT_PRESETS))
    measured = ([checkpoint_model(p) for p in args.checkpoint] + [export_model(p) for p in args.model] +
                [preset_model(name) for name in presets])
    files = [m.resolution for m in measured if m.resolution is not None]
    resolution = args.resolution or (files[0] if files else 224)
    if resolution < 8:
        raise ConfigError(f"--resolution: {resolution} is below 8 px")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
            x = x.to(device)
            engines: List[Engine] = []
            for model in measured:
                engines += build_engines(model, args.engines, x, args.precision, Path(tmp))
            if args.compare_timm:
                for timm_name in TIMM_MODELS:
                    timm_model = build_timm(timm_name).eval().to(device)
                    engines.append(Engine(f"timm:{timm_name}", "eager", _torch_engine(timm_model, x, args.precision)))
            time_rounds(engines, args.rounds, args.iters, args.warmup)
            for line in report(engines, batch, resolution, args.precision, device):
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
