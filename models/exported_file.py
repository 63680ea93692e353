"""The exported weights file (docs/inference.md), and the pixels-in classifier it describes.

The file (:func:`save_exported` / :func:`load_exported`) is safetensors: the training form's state dict (the
stable key contract, so the file can also start a fine-tune), with the model config, class names and eval
preprocessing as JSON in its metadata. Loading runs no pickle and needs no training code; it rebuilds the
inference form of :mod:`models.folding` (or the training form, on request).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig, stored_model_config
from .efficientnet import EfficientNet
from .folding import inference_form

#: ``format`` entry of the metadata; bumped when the file's layout changes.
EXPORT_FORMAT = "efficientnet-ipu-weights/1"
Interpolation = Literal["bilinear", "bicubic"]


class ExportError(ValueError):
    """An exported file that cannot be read or does not describe a model of this project; names the file."""


# ------------------------------------------------------------------------------------------------- images in
@dataclass(frozen=True)
class EvalPreprocessing:
    """How images reach the network: resize the shorter side to ``floor(resolution / crop_pct)`` with
    ``interpolation``, keep the centre ``resolution`` square, then ``(pixel - mean) / std`` in 0..255 units."""

    resolution: int
    crop_pct: float
    interpolation: Interpolation
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel of 0..255 pixels (uint8 or float), as the trainer does on the device."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, mean: Tuple[float, ...], std: Tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) * self.inv_std


class ImageClassifier(nn.Module):
    """Pixels (0..255, uint8 or float) in, logits out: the normalisation then ``network``. It is not folded
    into the stem conv, which is zero-padded (the border argument of :mod:`models.folding`)."""

    def __init__(self, network: nn.Module, preprocessing: EvalPreprocessing, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.normalize = Normalize(preprocessing.mean, preprocessing.std)
        self.network = network
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(images).to(self.dtype))


# ----------------------------------------------------------------------------------------- the weights file
@dataclass
class ExportedModel:
    """What :func:`load_exported` gives back: the network and everything needed to feed it."""

    network: nn.Module  # inference form (or training form, on request), eval mode, normalised float input
    config: ModelConfig
    class_names: List[str]
    preprocessing: EvalPreprocessing
    metadata: Dict[str, Any]  # the rest: weights kind, source checkpoint, phase, step

    def classifier(self) -> ImageClassifier:
        """The network behind the normalisation: uint8 (or 0..255 float) images in, logits out."""
        return ImageClassifier(self.network, self.preprocessing).eval()


def current_umask() -> int:
    """The process's umask (reading it means setting it; both calls are immediate)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_exported(path: Path, model_cfg: ModelConfig, state: Dict[str, torch.Tensor], class_names: List[str],
                  preprocessing: EvalPreprocessing, info: Dict[str, Any]) -> Path:
    """Write the training-form weights ``state`` (fp32) with the config, classes and preprocessing as metadata."""
    if len(class_names) != model_cfg.num_classes:
        raise ExportError(f"{len(class_names)} class names for a model with model.num_classes "
                          f"{model_cfg.num_classes}")
    tensors = {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
               for k, v in state.items()}
    metadata = {"format": EXPORT_FORMAT, "model": json.dumps(dataclasses.asdict(model_cfg)),
                "class_names": json.dumps(list(class_names)),
                "preprocessing": json.dumps(dataclasses.asdict(preprocessing)), "info": json.dumps(info)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # never a truncated file at ``path``
    try:
        save_file(tensors, str(partial), metadata=metadata)
        os.chmod(partial, 0o666 & ~current_umask())  # safetensors creates it owner-only; files follow the umask
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _metadata(path: Path) -> Dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except (OSError, SafetensorError) as err:
        raise ExportError(f"exported model {path} is not a readable safetensors file: {err}") from None
    if not meta or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if meta else None
        raise ExportError(f"exported model {path} was not written by train.export (format {found!r}, expected "
                          f"{EXPORT_FORMAT!r})")
    return meta


def _model_config(raw: Any, path: Path) -> ModelConfig:
    raw = stored_model_config(raw) if isinstance(raw, dict) else raw  # files written before model.norm_impl
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(raw, dict) or set(raw) - known:
        extra = sorted(set(raw) - known) if isinstance(raw, dict) else raw
        raise ExportError(f"exported model {path}: its model config has keys this version does not know: {extra}")
    cfg = ModelConfig(**raw)
    try:
        cfg.validate()
    except ValueError as err:
        raise ExportError(f"exported model {path}: {err}") from None
    return cfg


def load_exported(path: Union[str, Path], form: Literal["inference", "training"] = "inference") -> ExportedModel:
    """Rebuild the network of a file written by ``python -m train.export --format safetensors``, from that file
    alone: the inference form (default) or, for fine-tuning, the training form. No pickle is read."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported model {path} does not exist")
    meta = _metadata(path)
    try:
        cfg = _model_config(json.loads(meta["model"]), path)
        class_names = [str(c) for c in json.loads(meta["class_names"])]
        pre = json.loads(meta["preprocessing"])
        preprocessing = EvalPreprocessing(int(pre["resolution"]), float(pre["crop_pct"]), pre["interpolation"],
                                          tuple(pre["mean"]), tuple(pre["std"]))
        info = json.loads(meta.get("info", "{}"))
        weights = load_file(str(path))
    except (KeyError, TypeError, ValueError, SafetensorError) as err:
        raise ExportError(f"exported model {path} is damaged: {type(err).__name__}: {err}") from None
    network = EfficientNet(cfg)
    own = network.state_dict()
    if set(own) != set(weights) or any(own[k].shape != weights[k].shape for k in own):
        raise ExportError(f"exported model {path}: its weights do not fit the {cfg.name} its metadata describes")
    network.load_state_dict(weights)
    network.eval()
    out = inference_form(network) if form == "inference" else network
    return ExportedModel(out, cfg, class_names, preprocessing, info)
