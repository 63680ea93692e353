"""``python -m train.export``: a trained model out of the tool, as safetensors weights, ONNX or an IPU PopEF.

Checkpoints bundle optimizer state, RNG and the run's config; an export holds one set of weights (the per-epoch
average, the EMA or the raw weights) and what is needed to use them (docs/inference.md):

- ``safetensors``: the weights (training form, so the file can also start a fine-tune) with the model config,
  class names and eval preprocessing in the metadata; :func:`models.load_exported` rebuilds the network from the
  file alone, without pickle.
- ``onnx``: the inference form of the network (:func:`models.folding.inference_form`) at one resolution with a
  dynamic batch dimension; ``uint8`` NCHW pixels normalised inside the graph as in training, or already
  normalised ``float`` input. After the export, ONNX Runtime runs it on CPU on real images of the checkpoint's
  validation set and the figures against PyTorch's eval of the training form are printed.
- ``popef``: on IPUs, the inference form compiled by ``poptorch.inferenceModel(...).compileAndExport`` with the
  recipe's validation options (pipeline, replicas, precision, device iterations) for an offline IPU target: no
  IPU is needed to export, the file is what Graphcore's Triton backend and model runtime serve.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from data import DataConfig, build_dataset, build_transform
from ipu_options.apply import build_options
from ipu_options.pipeline import annotate_pipeline, prepare_precision
from ipu_options.plan import IpuPhasePlan
from models import EfficientNet
from models.exported_file import EvalPreprocessing, ExportError, ImageClassifier, save_exported
from models.folding import inference_form

from .backends.ipu_backend import import_poptorch
from .checkpoint import CheckpointError, load_checkpoint, load_weights
from .cli import run_guarded
from .config import Config, ConfigError, load_config
from .errors import StorageError
from .ipu_plan import resolve_phase
from .phases import Phase, run_phases
from .task import MEAN, STD

WeightsKind = Literal["averaged", "ema", "raw"]
WEIGHT_KINDS: Tuple[WeightsKind, ...] = ("averaged", "ema", "raw")
#: Where each kind lives in a checkpoint: ``averages`` entries written by the trainer (train/averaging.py).
AVERAGE_KEYS = {"averaged": ("epoch", "train.weight_avg_decay"), "ema": ("ema", "train.ema_decay")}
FORMATS = ("safetensors", "onnx", "popef")
#: ONNX opset of the exported graph: supported by torch 2.0.1's exporter and by every ONNX Runtime we pin.
ONNX_OPSET = 17


# -------------------------------------------------------------------------------------------- checkpoints
def checkpoint_weights(state: Dict[str, Any], kind: Optional[str], path: Path) -> Tuple[WeightsKind, Dict]:
    """The weights of ``kind`` in a checkpoint; ``None``: the per-epoch average if there is one, else the raw
    weights (what train.validate and train.finetune take)."""
    averages = state.get("averages") or {}
    if kind is None:
        kind = "averaged" if averages.get("epoch") else "raw"
    if kind == "raw":
        return "raw", state["model"]
    if kind not in AVERAGE_KEYS:
        raise ConfigError(f"--weights: {kind!r} is not one of {', '.join(WEIGHT_KINDS)}")
    key, config_key = AVERAGE_KEYS[kind]
    weights = averages.get(key)
    if not weights:
        have = ", ".join(["raw"] + [k for k, (a, _) in AVERAGE_KEYS.items() if averages.get(a)])
        raise CheckpointError(f"checkpoint {path} has no {kind} weights (the run had {config_key} off, or ended "
                              f"before the first average); it has: {have}")
    return kind, weights  # type: ignore[return-value]


@dataclass
class Trained:
    """A checkpoint's network in eval mode, with the config it ran with and which weights were taken."""

    cfg: Config
    network: EfficientNet
    weights: WeightsKind
    path: Path
    phase: str
    step: int

    @property
    def info(self) -> Dict[str, Any]:
        return {"checkpoint": self.path.name, "phase": self.phase, "step": self.step, "weights": self.weights}


def load_trained(path: Path, overrides: List[str], weights: Optional[str] = None) -> Trained:
    """Build the checkpoint's model, on the CPU in fp32, with the chosen weights (one-line errors throughout)."""
    state = load_checkpoint(path)
    cfg = load_config(None, overrides, base=state["config"])
    # An export is built and verified on the CPU and must load on any device: the opt-in Triton kernels
    # (model.norm_impl: triton) are a training-time choice, not part of the model.
    if cfg.model.norm_impl == "triton":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm_impl="auto"))
    kind, chosen = checkpoint_weights(state, weights, path)
    network = EfficientNet(cfg.model)
    load_weights(network, {k: v.float() if v.is_floating_point() else v for k, v in chosen.items()}, path)
    network.eval()
    position = state.get("position") or {}
    return Trained(cfg, network, kind, path, str(state.get("phase_name") or "train"), int(position.get("step", 0)))


def checkpoint_phase(cfg: Config, name: str) -> Phase:
    """The run phase a checkpoint was written in (the training phase if the config no longer has it)."""
    phases = run_phases(cfg)
    return next((p for p in phases if p.name == name), phases[0])


def default_resolution(trained: Trained) -> int:
    """The highest resolution the checkpoint's phase was validated at (the fine-tune phase: its own)."""
    return max(checkpoint_phase(trained.cfg, trained.phase).val_resolutions)


def eval_preprocessing(data: DataConfig, resolution: int) -> EvalPreprocessing:
    """The eval transform of ``data`` at ``resolution`` plus the trainer's normalisation (train/task.py)."""
    return EvalPreprocessing(resolution, data.eval_crop_pct, data.interpolation, MEAN, STD)


def class_names(cfg: Config, names_file: Optional[Path]) -> List[str]:
    """One name per line of ``names_file``, else the checkpoint's validation set's classes (folder names)."""
    if names_file is not None:
        try:
            names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--class-names: cannot read {names_file}: {err}") from None
    else:
        names = list(build_dataset(cfg.data, "val", build_transform("eval", 32, cfg.data)).classes)
    if len(names) != cfg.model.num_classes:
        source = str(names_file) if names_file else f"the {cfg.data.dataset} validation set"
        raise ConfigError(f"--class-names: {source} names {len(names)} classes but model.num_classes is "
                          f"{cfg.model.num_classes}")
    return names


def validation_images(cfg: Config, resolution: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images (uint8, eval transform at ``resolution``) and labels of the validation set."""
    dataset = build_dataset(cfg.data, "val", build_transform("eval", resolution, cfg.data))
    picked = [dataset[i] for i in range(min(count, len(dataset)))]
    return torch.stack([image for image, _ in picked]), torch.tensor([label for _, label in picked])


# ------------------------------------------------------------------------------------------------ formats
def export_safetensors(trained: Trained, out: Path, names: List[str], resolution: int) -> Dict[str, Any]:
    try:
        save_exported(out, trained.cfg.model, trained.network.state_dict(), names,
                      eval_preprocessing(trained.cfg.data, resolution), trained.info)
    except ExportError as err:
        raise ConfigError(str(err)) from None
    return {"format": "safetensors", "out": str(out), **trained.info}


def graph_module(trained: Trained, preprocessing: EvalPreprocessing, input_kind: str) -> nn.Module:
    """The module an ONNX graph is traced from: the inference form, behind the normalisation for uint8 input."""
    folded = inference_form(trained.network)
    return ImageClassifier(folded, preprocessing).eval() if input_kind == "uint8" else folded


def export_onnx(trained: Trained, out: Path, names: List[str], resolution: int, input_kind: str,
                opset: int = ONNX_OPSET) -> None:
    """Trace the inference form into ``out`` (dynamic batch) and record the model's facts as metadata."""
    import onnx

    preprocessing = eval_preprocessing(trained.cfg.data, resolution)
    module = graph_module(trained, preprocessing, input_kind)
    dtype = torch.uint8 if input_kind == "uint8" else torch.float32
    example = torch.zeros(2, trained.cfg.model.in_channels, resolution, resolution, dtype=dtype)
    # The TorchScript-based exporter: the same code path under torch 2.0.1 (the SDK's) and current torch, where it
    # is ``dynamo=False`` (the default became the torch.export-based exporter in torch 2.9).
    extra: Dict[str, Any] = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    # torch 2.0.1's exporter prints a diagnostics summary to stdout, which holds this command's JSON lines.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # Chosen on purpose (above), and what tracing says about shape checks it freezes, are not the user's to fix.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(out), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True, **extra)
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    facts = {"model": json.dumps(dataclasses.asdict(trained.cfg.model)), "class_names": json.dumps(names),
             "input": input_kind, "preprocessing": json.dumps(dataclasses.asdict(preprocessing)),
             **{k: str(v) for k, v in trained.info.items()}}
    del graph.metadata_props[:]
    for key, value in facts.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(out))


def verify_onnx(path: Path, trained: Trained, images: torch.Tensor, input_kind: str) -> Dict[str, Any]:
    """Run the ONNX file in ONNX Runtime on CPU and compare it with PyTorch's eval of the training form."""
    import onnxruntime as ort

    preprocessing = eval_preprocessing(trained.cfg.data, int(images.shape[-1]))
    reference_model = ImageClassifier(trained.network, preprocessing).eval()
    with torch.no_grad():
        reference = reference_model(images).double()
        feed = images if input_kind == "uint8" else reference_model.normalize(images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(np.asarray(session.run(["logits"], {"images": feed.numpy()})[0])).double()
    diff = (got - reference).abs().max().item()
    return {"verified_images": len(images), "max_abs_logit_diff": diff,
            "max_rel_logit_diff": diff / max(reference.abs().max().item(), 1e-12),
            "top1_agreement": float((got.argmax(1) == reference.argmax(1)).double().mean()),
            "onnxruntime": ort.__version__}


@dataclass
class IpuInference:
    """An inference executor of the folded network with a recipe's validation options, and one host call's
    inputs (micro-batch x device iterations x replicas uint8 images)."""

    executor: Any
    images: torch.Tensor
    plan: IpuPhasePlan


def ipu_inference(cfg: Config, phase: Phase, network: EfficientNet, resolution: int) -> IpuInference:
    """``poptorch.inferenceModel`` of ``network``'s inference form with the phase's validation options (pipeline,
    replicas, precision, device iterations) for an offline IPU target: compiling needs PopTorch, not an IPU."""
    poptorch = import_poptorch()
    plan = resolve_phase(cfg, phase)
    options = build_options(poptorch, plan, training=False, offline=True)
    folded = inference_form(network)
    dtype = prepare_precision(folded, plan.precision, plan.settings.norm_precision)
    annotate_pipeline(folded, plan.stages, poptorch)
    model = ImageClassifier(folded, eval_preprocessing(cfg.data, resolution), dtype).eval()
    images = torch.zeros(plan.eval_samples_per_call, cfg.model.in_channels, resolution, resolution,
                         dtype=torch.uint8)
    return IpuInference(poptorch.inferenceModel(model, options=options), images, plan)


def export_popef(trained: Trained, out: Path, resolution: int) -> Dict[str, Any]:
    """Compile the inference form with the recipe's validation options for an offline IPU and export it."""
    ipu = ipu_inference(trained.cfg, checkpoint_phase(trained.cfg, trained.phase), trained.network, resolution)
    out.parent.mkdir(parents=True, exist_ok=True)
    # export_model=False: the file holds the executable and PopTorch's input description, not a pickle of the
    # network (docs/inference.md).
    ipu.executor.compileAndExport(str(out), ipu.images, export_model=False)
    plan = ipu.plan
    return {"format": "popef", "out": str(out), "resolution": resolution, "batch_per_call": len(ipu.images),
            "micro_batch_size": plan.eval_micro_batch_size, "device_iterations": plan.eval_device_iterations,
            "replicas": plan.local_replicas, "ipus_per_replica": plan.ipus_per_replica, "precision": plan.precision,
            **trained.info}


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint of this tool (*.pt)")
    p.add_argument("--out", type=Path, required=True, help="the file to write")
    p.add_argument("--format", choices=FORMATS, help="default: from the suffix of --out (.safetensors, .onnx, "
                                                     ".popef)")
    p.add_argument("--weights", choices=WEIGHT_KINDS,
                   help="averaged: the per-epoch average (train.weight_avg_decay), ema: the per-step EMA "
                        "(train.ema_decay), raw: the trained weights; default: averaged if the checkpoint has it, "
                        "else raw")
    p.add_argument("--resolution", type=int,
                   help="input size of the ONNX graph / PopEF, and the eval preprocessing recorded in every format; "
                        "default: the highest resolution the checkpoint's phase was validated at")
    p.add_argument("--input", choices=["uint8", "float"], default="uint8",
                   help="onnx: uint8 NCHW pixels normalised in the graph as in training, or float input already "
                        "normalised ((pixel - mean) / std, 0..255 units; mean/std in the metadata)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help="onnx: the opset of the graph")
    p.add_argument("--verify-samples", type=int, default=32,
                   help="onnx: validation images run in ONNX Runtime against PyTorch after the export (0: none)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="onnx: largest accepted logit difference, relative to the largest logit")
    p.add_argument("--class-names", type=Path,
                   help="file with one class name per line; default: the class folders of the validation set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the checkpoint's config (e.g. data.path=..., data.eval_crop_pct=0.95)")
    return p


def output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = args.out.suffix.lstrip(".").lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out {args.out}: cannot tell the format from the suffix {args.out.suffix!r}; name a "
                          f"file *.safetensors, *.onnx or *.popef, or pass --format")
    return suffix


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    failed: List[str] = []

    def job() -> None:
        fmt = output_format(args)
        if args.resolution is not None and args.resolution < 8:
            raise ConfigError(f"--resolution: {args.resolution} is below 8 px")
        trained = load_trained(args.checkpoint, args.overrides, args.weights)
        resolution = args.resolution or default_resolution(trained)
        names = class_names(trained.cfg, args.class_names) if fmt != "popef" else []
        try:
            if fmt == "popef":
                print(json.dumps(export_popef(trained, args.out, resolution)), flush=True)
                return
            if fmt == "safetensors":
                print(json.dumps(export_safetensors(trained, args.out, names, resolution)), flush=True)
                return
            export_onnx(trained, args.out, names, resolution, args.input, args.opset)
        except (OSError, SafetensorError) as err:
            raise StorageError(f"--out {args.out}: cannot write it ({err})") from None
        line: Dict[str, Any] = {"format": "onnx", "out": str(args.out), "opset": args.opset, "input": args.input,
                                "resolution": resolution, **trained.info}
        if args.verify_samples > 0:
            images, _ = validation_images(trained.cfg, resolution, args.verify_samples)
            line.update(verify_onnx(args.out, trained, images, args.input))
            if line["max_rel_logit_diff"] > args.tolerance or line["top1_agreement"] < 1.0:
                failed.append(f"error: ONNX Runtime differs from PyTorch beyond --tolerance {args.tolerance}: max "
                              f"relative logit difference {line['max_rel_logit_diff']:.2e}, top-1 agreement "
                              f"{line['top1_agreement']:.4f}")
        print(json.dumps(line), flush=True)

    code = run_guarded(job)
    for message in failed:
        print(message, file=sys.stderr)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
