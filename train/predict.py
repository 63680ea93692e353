"""``python -m train.predict``: classify image files with a checkpoint or an exported model, one JSON line each.

Images get the eval transform (resize by ``data.eval_crop_pct`` with ``data.interpolation``, centre crop; from the
checkpoint's config, or from an exported file's metadata) and run in batches through the inference form of the
network: in PyTorch for a checkpoint or a safetensors export, in ONNX Runtime for an ONNX export (``--model
*.onnx``). Each line: ``{"path", "topk": [{"index", "label", "prob"}, ...]}`` in the order the files were given
(folders: sorted, recursively). A file that cannot be decoded is named on stderr and skipped, and the others go
on; with ``--fail-on-error`` it stops the run (exit code 2) after the lines already printed. When no image at all
could be predicted the run ends with one error line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data import DataError, Preprocessing
from data.base import DECODE_ERRORS
from models import ExportError, inference_form, load_exported
from models.exported_file import EvalPreprocessing, ImageClassifier, Normalize

from .checkpoint import CheckpointError
from .cli import run_guarded
from .config import ConfigError
from .export import WEIGHT_KINDS, class_names, default_resolution, eval_preprocessing, load_trained

#: What a folder is searched for (Pillow opens more, but these are the formats of image data sets).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif"}


@dataclass
class Predictor:
    """The classifier (uint8 pixels in, logits out), its preprocessing and its class names."""

    model: nn.Module
    preprocessing: EvalPreprocessing
    class_names: List[str]


def from_checkpoint(path: Path, overrides: List[str], weights: Optional[str], resolution: Optional[int],
                    names_file: Optional[Path]) -> Predictor:
    trained = load_trained(path, overrides, weights)
    preprocessing = eval_preprocessing(trained.cfg.data, resolution or default_resolution(trained))
    try:
        names = class_names(trained.cfg, names_file)
    except DataError as err:  # the class folders are only known to the data set: without it, indices stand in
        print(f"warning: no class names ({err}); labels are class indices (pass --class-names)", file=sys.stderr)
        names = [str(i) for i in range(trained.cfg.model.num_classes)]
    return Predictor(ImageClassifier(inference_form(trained.network), preprocessing).eval(), preprocessing, names)


def from_export(path: Path, resolution: Optional[int]) -> Predictor:
    try:
        exported = load_exported(path)
    except ExportError as err:
        raise CheckpointError(str(err)) from None
    pre = exported.preprocessing
    if resolution is not None:
        pre = EvalPreprocessing(resolution, pre.crop_pct, pre.interpolation, pre.mean, pre.std)
    return Predictor(ImageClassifier(exported.network, pre).eval(), pre, exported.class_names)


class OnnxClassifier(nn.Module):
    """An ONNX export of ``train.export`` run in ONNX Runtime on the CPU: pixels in, logits out, like
    :class:`ImageClassifier` (a float-input export gets the normalisation here, as its metadata says)."""

    def __init__(self, session: Any, normalize: Optional[Normalize]):
        super().__init__()
        self.session, self.normalize = session, normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feed = images if self.normalize is None else self.normalize(images)
        (logits,) = self.session.run(["logits"], {"images": feed.cpu().numpy()})
        return torch.from_numpy(np.asarray(logits))


#: The metadata ``train.export --format onnx`` writes that predict needs (docs/inference.md).
ONNX_FACTS = ("class_names", "input", "preprocessing")


def from_onnx(path: Path, resolution: Optional[int]) -> Predictor:
    """The ONNX file's graph in ONNX Runtime, with the preprocessing and class names from its metadata. The graph
    was traced at one resolution (only the batch is dynamic), so another ``--resolution`` is refused."""
    import onnxruntime as ort  # only ONNX exports need it, and it costs a second to import

    if not path.is_file():
        raise CheckpointError(f"--model {path} does not exist")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime raises its own exception types for files it cannot read
        raise CheckpointError(f"--model {path} is not a readable ONNX model: {str(err).splitlines()[0]}") from None
    facts = session.get_modelmeta().custom_metadata_map
    missing = [key for key in ONNX_FACTS if key not in facts]
    if missing:
        raise CheckpointError(f"--model {path} has no {missing[0]!r} metadata: predict reads ONNX files written by "
                              "python -m train.export")
    raw = json.loads(facts["preprocessing"])
    pre = EvalPreprocessing(int(raw["resolution"]), float(raw["crop_pct"]), raw["interpolation"],
                            tuple(raw["mean"]), tuple(raw["std"]))
    if resolution is not None and resolution != pre.resolution:
        raise ConfigError(f"--resolution {resolution}: {path} takes {pre.resolution} px images only (an ONNX graph "
                          "is traced at one resolution; export again with train.export --resolution)")
    normalize = Normalize(pre.mean, pre.std) if facts["input"] == "float" else None
    return Predictor(OnnxClassifier(session, normalize).eval(), pre, json.loads(facts["class_names"]))


def image_files(inputs: Sequence[str]) -> List[Path]:
    """Files as given, folders expanded to their image files (sorted, recursively); a missing path is an error."""
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return files


class ImageFiles(Dataset):
    """``(index, uint8 image or None, error or None)`` per file: a broken file is reported, not raised, so one
    bad image does not lose the batch around it."""

    def __init__(self, files: List[Path], transform: Preprocessing):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            with Image.open(self.files[i]) as image:
                return i, self.transform(image), None
        except DECODE_ERRORS as err:
            return i, None, f"{type(err).__name__}: {err}"


def _collate(items: List[Tuple[int, Optional[torch.Tensor], Optional[str]]]) -> List:
    return items


def transform_of(pre: EvalPreprocessing) -> Preprocessing:
    return Preprocessing("eval", pre.resolution, crop_pct=pre.crop_pct, interpolation=pre.interpolation)


def predictions(predictor: Predictor, files: List[Path], batch_size: int, topk: int, workers: int,
                device: torch.device, progress: bool) -> Iterator[Tuple[Path, Optional[dict], Optional[str]]]:
    """``(file, result line or None, error or None)`` per file, in order."""
    loader = DataLoader(ImageFiles(files, transform_of(predictor.preprocessing)), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate)
    model = predictor.model.to(device)
    k = min(topk, len(predictor.class_names))
    with tqdm(total=len(files), desc="predict", unit="image", file=sys.stderr, disable=not progress) as bar:
        for batch in loader:
            good = [(i, image) for i, image, error in batch if image is not None]
            top: List[Tuple[List[float], List[int]]] = []
            if good:
                with torch.no_grad():
                    probs = model(torch.stack([image for _, image in good]).to(device)).float().softmax(1)
                values, indices = probs.topk(k, dim=1)
                top = list(zip(values.tolist(), indices.tolist(), strict=True))
            results = dict(zip([i for i, _ in good], top, strict=True))
            for i, _, error in batch:
                if error is not None:
                    yield files[i], None, error
                    continue
                values_i, indices_i = results[i]
                yield files[i], {"path": str(files[i]), "topk": [
                    {"index": c, "label": predictor.class_names[c], "prob": round(p, 6)}
                    for p, c in zip(values_i, indices_i, strict=True)]}, None
            bar.update(len(batch))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint of this tool")
    source.add_argument("--model", type=Path, help="a file written by train.export: *.onnx runs in ONNX Runtime "
                        "(CPU), any other name is read as safetensors")
    p.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files, or folders searched recursively")
    p.add_argument("--topk", type=int, default=5, help="classes per image, most probable first")
    p.add_argument("--resolution", type=int,
                   help="input size; default: the export's, or the highest the checkpoint's phase validated at")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 1) - 1)),
                   help="decoding processes (0: in this process)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--weights", choices=WEIGHT_KINDS, help="--checkpoint: which weights (as train.export)")
    p.add_argument("--class-names", type=Path,
                   help="--checkpoint: one class name per line (an export carries its own); default: the class "
                        "folders of the checkpoint's validation set")
    p.add_argument("--fail-on-error", action="store_true",
                   help="stop at the first image that cannot be decoded (exit code 2) instead of skipping it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="--checkpoint: override its config (e.g. data.eval_crop_pct=1.0, data.interpolation=bicubic)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> None:
        if args.topk < 1 or args.batch_size < 1 or args.workers < 0:
            raise ConfigError("--topk and --batch-size must be >= 1, --workers >= 0")
        if args.resolution is not None and args.resolution < 8:
            raise ConfigError(f"--resolution: {args.resolution} is below 8 px")
        if args.model is not None and (args.overrides or args.weights or args.class_names):
            raise ConfigError("--set, --weights and --class-names apply to --checkpoint; an exported model carries "
                              "its config, weights and class names")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
        onnx = args.model is not None and args.model.suffix.lower() == ".onnx"
        if onnx and args.device == "cuda":
            raise ConfigError("--device cuda: an ONNX model runs in ONNX Runtime on the CPU here (--device cpu)")
        if onnx:
            device = torch.device("cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: this torch sees no CUDA device")
        files = image_files(args.images)
        if onnx:
            predictor = from_onnx(args.model, args.resolution)
        elif args.model is not None:
            predictor = from_export(args.model, args.resolution)
        else:
            predictor = from_checkpoint(args.checkpoint, args.overrides, args.weights, args.resolution,
                                        args.class_names)
        progress = len(files) > 1 and any(Path(i).is_dir() for i in args.images)
        skipped = 0
        for path, line, error in predictions(predictor, files, args.batch_size, args.topk, args.workers, device,
                                             progress):
            if error is None:
                print(json.dumps(line), flush=True)
                continue
            if args.fail_on_error:
                raise DataError(f"cannot decode image {path}: {error}")
            skipped += 1
            # through tqdm, so the line is not glued to the progress bar's
            tqdm.write(f"warning: skipped {path}: cannot decode it ({error})", file=sys.stderr)
        if skipped == len(files):
            raise DataError(f"no image could be predicted: all {skipped} failed to decode (named above)")
        if skipped:
            print(f"warning: {skipped} of {len(files)} images skipped", file=sys.stderr)

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
