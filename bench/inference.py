"""Inference speed of model presets: ``python -m bench.inference --help``.

For each preset and batch size, one process times the engines side by side: ``eager`` (the training form in eval
mode, what validation runs), ``folded`` (the inference form of models/folding.py: proxy norm frozen, BatchNorm
and proxy-norm affines folded), ``compile`` (``torch.compile`` of the folded form), ``onnxruntime`` (the folded form
exported as train.export does, in ONNX Runtime) and, with ``--compare-timm``, timm's ``efficientnet_b0`` and
``efficientnet_b0_gn`` in eager mode. Weights are random (speed does not depend on them); the input is one
normalised float batch made once on the device.

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
from models import EfficientNet, ModelConfig, inference_form
from train.cli import run_guarded
from train.config import ConfigError, load_config
from train.export import ONNX_OPSET, Trained, export_onnx, ipu_inference
from train.phases import run_phases

ENGINES = ("eager", "folded", "compile", "onnxruntime")
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


def build_engines(name: str, model_cfg: ModelConfig, engines: Sequence[str], x: torch.Tensor, precision: str,
                  folder: Path) -> List[Engine]:
    network = EfficientNet(model_cfg).eval()
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
    p.add_argument("--models", type=_csv, default=["efficientnet-b0-g16-ln-pn", "efficientnet-b0-g1-bn"],
                   help=f"comma-separated presets from configs/models/ (e.g. {', '.join(preset_names()[:2])})")
    p.add_argument("--engines", type=_csv, default=list(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--resolution", type=int, default=224)
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
    try:
        presets = {name: load_preset(name) for name in args.models}
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
            x = x.to(device)
            engines: List[Engine] = []
            for name, model_cfg in presets.items():
                torch.manual_seed(0)
                engines += build_engines(name, model_cfg, args.engines, x, args.precision, Path(tmp))
            if args.compare_timm:
                for timm_name in TIMM_MODELS:
                    timm_model = build_timm(timm_name).eval().to(device)
                    engines.append(Engine(f"timm:{timm_name}", "eager", _torch_engine(timm_model, x, args.precision)))
            time_rounds(engines, args.rounds, args.iters, args.warmup)
            for line in report(engines, batch, args.resolution, args.precision, device):
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
