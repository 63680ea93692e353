"""Host input-pipeline throughput: ``python -m bench.data --help``.

Runs, in one process and interleaved repeat by repeat, a plain torchvision pipeline (ImageFolder-style
``Image.open(...).convert("RGB")`` → ``RandomResizedCrop`` → flip → ``PILToTensor``, or ``Resize`` →
``CenterCrop`` → ``PILToTensor`` for ``--split val``, with the same crop scale and ratio) and the project's
(``fused``: crop first, JPEG decoded at the DCT scale the crop allows; ``plain``: the same code with
``data.fused_decode: false``) through a ``DataLoader`` with ``--workers`` workers. Each pipeline prints one JSON
line: ``images_per_s`` (median over the repeats), ``images_per_s_per_worker``, the per-image time split measured
in the main process (``read_ms`` / ``decode_ms`` / ``augment_ms`` / ``collate_ms``; the project's decode includes
its crop and resize, which the fused path does at the decoded scale) and ``ratio_vs_torchvision`` (median of the
per-repeat ratios, so a load change on a shared machine hits both sides of a ratio alike; ``ratio_range`` their
lowest and highest). ``--compare-resize`` adds a line that times the C resize, Pillow's and torch's uint8
antialiased ``interpolate`` on the same decoded crops and compares torch's pixels with Pillow's.

``--make-test-images DIR`` writes an ImageNet-sized JPEG set (train/ and val/, sizes 300-800 px, quality 75-95)
from real images: the CIFAR-10 tarball or folder given by ``--source``, or Fashion-MNIST (``--source
fashion-mnist``). See docs/data.md for what the two ``--style`` options stand for.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from io import BytesIO
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms

from data import DataConfig, DataError, build_dataset, build_transform, resample
from data.base import to_rgb  # the same conversion the pipeline uses
from data.decode import DECODERS, JPEG_DECODERS, Crop, Region, can_decode_scaled, choose_decoders, dct_scale
from data.encoded import EncodedImageDataset
from data.host import usable_cores
from data.loader import build_loader
from data.transforms import RESAMPLE, Preprocessing, PreprocessingKind
from train.cli import run_guarded

PIPELINES = ("torchvision", "fused", "plain")
SIZE_RANGE = (300, 800)  # longer side, px
QUALITY_RANGE = (75, 95)
ASPECTS = (4 / 3, 3 / 2, 1.0, 16 / 9, 5 / 4)  # common photo shapes; each is also used upright
TILE = 32  # mosaic style: source images at (about) their native size


# ------------------------------------------------------------------------------------------ test images
def _sources(source: str) -> Tuple[EncodedImageDataset, ...]:
    if source == "fashion-mnist":
        cfg = DataConfig(dataset="fashion-mnist")
    else:
        cfg = DataConfig(dataset="tar" if os.path.isfile(source) else "imagefolder", path=source)
    transform = build_transform("eval", 32, cfg)
    return tuple(build_dataset(cfg, split, transform) for split in ("train", "val"))  # type: ignore[misc]


def _canvas_size(rng: random.Random) -> Tuple[int, int]:
    longer = rng.randint(*SIZE_RANGE)
    aspect = rng.choice(ASPECTS)
    shorter = int(round(longer / aspect))
    return (longer, shorter) if rng.random() < 0.75 else (shorter, longer)  # most photos are landscape


def _test_image(dataset, j: int, size: Tuple[int, int], style: str, rng: random.Random) -> Image.Image:
    """``resized``: source image ``j`` scaled to ``size``; ``mosaic``: ``size`` tiled with source images from
    ``j`` on at about their native size (the detail, and so the bytes per pixel, of a real photograph)."""
    if style == "resized":
        return to_rgb(dataset._open(j)).resize(size, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", size)
    k = j
    for top in range(0, size[1], TILE):
        for left in range(0, size[0], TILE):
            tile = to_rgb(dataset._open(k % len(dataset)))
            if tile.size != (TILE, TILE):
                tile = tile.resize((TILE, TILE), Image.Resampling.BICUBIC)
            canvas.paste(tile, (left, top))
            k += rng.randint(1, 97)
    return canvas


def make_test_images(out: Path, source: str, count: int, style: str, seed: int) -> Dict[str, float]:
    """``count`` training and ``count // 5`` validation JPEGs under ``out/{train,val}/<class>/``."""
    rng = random.Random(seed)
    written, pixels, nbytes = 0, 0, 0
    for dataset, split, n in zip(_sources(source), ("train", "val"), (count, max(count // 5, 1))):
        picks = rng.sample(range(len(dataset)), min(n, len(dataset)))
        for j in picks:
            label = dataset.classes[int(dataset._labels[j])].replace("/", "-")
            size = _canvas_size(rng)
            path = out / split / label / f"{j:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            _test_image(dataset, j, size, style, rng).save(path, quality=rng.randint(*QUALITY_RANGE))
            written, pixels, nbytes = written + 1, pixels + size[0] * size[1], nbytes + path.stat().st_size
    return {"images": written, "mean_pixels": round(pixels / written), "mean_kb": round(nbytes / written / 1024, 1),
            "bits_per_pixel": round(8 * nbytes / pixels, 2)}


# --------------------------------------------------------------------------------------------- pipelines
class TorchvisionBaseline(Dataset):
    """What a torchvision user writes: ``ImageFolder``'s loader (open, convert to RGB) and a ``Compose``, on the
    same files (read through the project's data set so folders and tars both work)."""

    def __init__(self, files: EncodedImageDataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def load(self, j: int) -> Image.Image:
        return Image.open(BytesIO(self.files._read(j))).convert("RGB")

    def __getitem__(self, j: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.load(j)), int(self.files._labels[j])


def torchvision_transform(split: str, resolution: int, cfg: DataConfig) -> transforms.Compose:
    bilinear = transforms.InterpolationMode.BILINEAR
    if split == "train":
        steps = [transforms.RandomResizedCrop(resolution, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                              interpolation=bilinear), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(int(resolution * 256 / 224), interpolation=bilinear),
                 transforms.CenterCrop(resolution)]
    return transforms.Compose(steps + [transforms.PILToTensor()])


def time_split(pipeline: str, dataset, indices: Sequence[int], batch_size: int) -> Dict[str, object]:
    """Milliseconds per image in each stage, measured in this process on ``indices`` with one torch thread, as in
    a DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_split(pipeline, dataset, indices, batch_size)
    finally:
        torch.set_num_threads(threads)


def _time_split(pipeline: str, dataset, indices: Sequence[int], batch_size: int) -> Dict[str, object]:
    totals = dict.fromkeys(("read_ms", "decode_ms", "augment_ms", "collate_ms"), 0.0)
    scales: Dict[int, int] = collections.Counter()
    batch: List[Tuple[torch.Tensor, int]] = []
    files = dataset.files if pipeline == "torchvision" else dataset
    for n, j in enumerate(indices):
        t0 = time.perf_counter()
        data = files._read(j)
        t1 = time.perf_counter()
        if pipeline == "torchvision":
            image = Image.open(BytesIO(data)).convert("RGB")
            t2 = time.perf_counter()
            sample = dataset.transform(image)
        else:
            draws = dataset.transform.draws(n)
            image = Image.open(BytesIO(data))
            if dataset.transform.fused_decode:
                scales[_scale_of(dataset.transform, image, random.Random(n))] += 1
            region = dataset.transform.region(image, draws)
            t2 = time.perf_counter()
            sample = dataset.transform.finish(region, draws, n)
        t3 = time.perf_counter()
        batch.append((sample, int(files._labels[j])))
        if len(batch) == batch_size or n == len(indices) - 1:
            default_collate(batch)
            batch = []
        t4 = time.perf_counter()
        for key, start, end in (("read_ms", t0, t1), ("decode_ms", t1, t2), ("augment_ms", t2, t3),
                                ("collate_ms", t3, t4)):
            totals[key] += (end - start) * 1e3
    split: Dict[str, object] = {key: round(value / len(indices), 3) for key, value in totals.items()}
    if scales:
        split["dct_scales"] = {f"1/{k}": round(v / len(indices), 3) for k, v in sorted(scales.items())}
    return split


def _scale_of(transform, image: Image.Image, draws: random.Random) -> int:
    """The DCT scale the fused decode uses for this sample (1 for files it decodes at full size)."""
    if not can_decode_scaled(image):
        return 1
    return dct_scale(transform.box(image.width, image.height, draws), transform.resolution)


def images_per_s(loader: Iterator, images: int) -> float:
    """Throughput after the first batch (worker start-up excluded)."""
    first = next(loader)
    done, start = 0, time.perf_counter()
    del first
    for batch in loader:
        done += len(batch[1])
        if done >= images:
            break
    return done / (time.perf_counter() - start)


def machine(jpeg_decoder: str) -> Dict[str, object]:
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {"machine": platform.machine(), "cpu": model, "cores_usable": usable_cores(),
            "python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
            "jpeg_decoder": choose_decoders(jpeg_decoder).name,
            "jpeg_decoders_unavailable": {d.name: d.unavailable() for d in DECODERS if d.unavailable()},
            "resize": resample.in_use(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def run_benchmark(args: argparse.Namespace) -> List[Dict[str, object]]:
    cfg = DataConfig(dataset="tar" if os.path.isfile(args.data) else "imagefolder", path=args.data,
                     jpeg_decoder=args.jpeg_decoder)
    kind: PreprocessingKind = "train" if args.split == "train" else "eval"
    files = build_dataset(cfg, args.split, build_transform(kind, args.resolution, cfg))
    if not isinstance(files, EncodedImageDataset):
        raise DataError(f"--data {args.data}: expected an image folder or tar of encoded images")
    datasets = {
        "torchvision": TorchvisionBaseline(files, torchvision_transform(args.split, args.resolution, cfg)),
        "fused": files,
        "plain": files.with_transform(build_transform(kind, args.resolution,
                                                      dataclasses.replace(cfg, fused_decode=False))),
    }
    pipelines = [p for p in args.pipelines.split(",") if p]
    needed = args.images + args.batch_size  # the first batch is the warm-up
    if len(files) < needed:
        raise DataError(f"--data {args.data}: its {args.split} split has {len(files)} images; --images "
                        f"{args.images} needs at least {needed} (make more with --make-test-images)")
    rates: Dict[str, List[float]] = {name: [] for name in pipelines}
    for repeat in range(args.repeats):
        for name in pipelines:
            rates[name].append(images_per_s(iter(make_loader(name, datasets[name], args, repeat)), args.images))
    sample = random.Random(args.seed).sample(range(len(files)), min(args.split_images, len(files)))  # every class
    lines = []
    for name in pipelines:
        median = statistics.median(rates[name])
        line: Dict[str, object] = {
            "pipeline": name, "split": args.split, "resolution": args.resolution, "workers": args.workers,
            "images": args.images, "repeats": args.repeats, "images_per_s": round(median, 1),
            "images_per_s_per_worker": round(median / max(args.workers, 1), 1),
            **time_split(name, datasets[name], sample, args.batch_size),
        }
        if "torchvision" in rates:
            ratios = [a / b for a, b in zip(rates[name], rates["torchvision"])]
            line["ratio_vs_torchvision"] = round(statistics.median(ratios), 3)
            line["ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]  # how far the repeats spread
        lines.append(line)
    if args.compare_resize:
        lines.append(compare_resizes(files.transform, files, sample, args.repeats))
    return lines


def make_loader(name: str, dataset, args: argparse.Namespace, repeat: int) -> DataLoader:
    if name == "torchvision":
        torch.manual_seed(repeat)
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                          drop_last=True)
    return build_loader(dataset, args.batch_size, shuffle=True, seed=repeat, epoch=0, workers=args.workers,
                        drop_last=True, pin_memory=False, persistent_workers=False)


# ------------------------------------------------------------------------------------------ resize compared
def decoded_crops(transform: Preprocessing, files: EncodedImageDataset, indices: Sequence[int]) -> List[Region]:
    """The fused path's decoded crops of the plain JPEGs among ``indices``: what its resize is given."""
    regions = []
    for n, j in enumerate(indices):
        image = Image.open(BytesIO(files._read(j)))
        if transform.decoders is None or not can_decode_scaled(image):
            continue
        box = transform.box(image.width, image.height, transform.draws(n))
        regions.append(transform.decoders.decode(Crop(image, box, transform.resolution, transform.kind == "train")))
    return regions


def torch_resize(tensor: torch.Tensor, resolution: int, mode: str) -> torch.Tensor:
    """torch's antialiased uint8 resize of a [1, C, H, W] tensor (channels last, as the decoders lay it out) to
    ``resolution`` square: it takes no box, so the whole tensor is resized."""
    return torch.nn.functional.interpolate(tensor, size=(resolution, resolution), mode=mode, antialias=True)


def compare_resizes(transform: Preprocessing, files: EncodedImageDataset, indices: Sequence[int],
                    repeats: int) -> Dict[str, object]:
    """The C resize (data/resample.c), Pillow's and torch's uint8 antialiased ``interpolate`` on the same decoded
    crops, interleaved repeat by repeat in this process with one torch thread: crops per second (medians), torch's
    rate over the C resize's (median of the per-repeat ratios), and how far torch's pixels are from Pillow's
    (which the C resize equals), on the crops whose box is the whole decoded region (the same geometry for both)
    and on all of them (torch takes no fractional box). A torch without the uint8 kernel is reported, not timed."""
    regions = decoded_crops(transform, files, indices)
    if not regions:
        raise DataError("--compare-resize: no plain JPEG among the timed images (or data.fused_decode is off)")
    name = "bilinear" if transform.kind == "train" else transform.interpolation
    size, pillow_filter = (transform.resolution, transform.resolution), RESAMPLE[name]
    pixels = [np.ascontiguousarray(region.pixels) for region in regions]
    images = [Image.frombuffer("RGBX", (p.shape[1], p.shape[0]), p, "raw", "RGBX", 0, 1) for p in pixels]
    tensors = [torch.from_numpy(p).permute(2, 0, 1).unsqueeze(0) for p in pixels]
    runs: Dict[str, Callable[[], object]] = {
        "c": lambda: [resample.resize_rgbx(p, size, pillow_filter, r.box) for p, r in zip(pixels, regions)],
        "pillow": lambda: [im.resize(size, pillow_filter, box=r.box) for im, r in zip(images, regions)],
        "torch": lambda: [torch_resize(t, transform.resolution, name) for t in tensors],
    }
    line: Dict[str, object] = {"resize_compare": transform.kind, "resolution": transform.resolution, "filter": name,
                               "crops": len(regions), "repeats": repeats, "c_resize": resample.in_use(),
                               "torch": torch.__version__}
    try:
        torch_resize(tensors[0], transform.resolution, name)
    except (RuntimeError, NotImplementedError) as err:  # torch 2.0 has no uint8 antialiased kernel
        line["torch_unavailable"] = str(err).splitlines()[0]
        del runs["torch"]
    rates: Dict[str, List[float]] = {key: [] for key in runs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(repeats):
            for key, run in runs.items():
                start = time.perf_counter()
                run()
                rates[key].append(len(regions) / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    line["crops_per_s"] = {key: round(statistics.median(r), 1) for key, r in rates.items()}
    if "torch" in rates:
        line["torch_vs_c"] = round(statistics.median([t / c for t, c in zip(rates["torch"], rates["c"])]), 3)
        line["torch_vs_pillow_levels"] = torch_pixel_gap(images, tensors, regions, size, pillow_filter, name)
    return line


def torch_pixel_gap(images: Sequence[Image.Image], tensors: Sequence[torch.Tensor], regions: Sequence[Region],
                    size: Tuple[int, int], pillow_filter: int, mode: str) -> Dict[str, Dict[str, object]]:
    """Largest |torch - Pillow| in levels and the share of values more than one level apart: on the crops whose box
    is the whole decoded region (``same_box``) and on all."""
    gaps: Dict[str, List[np.ndarray]] = {"same_box": [], "all": []}
    for image, tensor, region in zip(images, tensors, regions):
        expected = np.asarray(image.resize(size, pillow_filter, box=region.box))[:, :, :3].astype(np.int16)
        got = torch_resize(tensor, size[0], mode)[0, :3].permute(1, 2, 0).numpy().astype(np.int16)
        gap = np.abs(got - expected).ravel()
        gaps["all"].append(gap)
        if region.box == (0, 0, region.pixels.shape[1], region.pixels.shape[0]):
            gaps["same_box"].append(gap)
    report: Dict[str, Dict[str, object]] = {}
    for key, found in gaps.items():
        joined = np.concatenate(found) if found else np.zeros(0, dtype=np.int16)
        report[key] = {"crops": len(found), "max": int(joined.max()) if found else None,
                       "share_over_1": round(float(np.mean(joined > 1)), 5) if found else None}
    return report

# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="image folder or tar (train/<class>/*.jpg, val/<class>/*.jpg)")
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="train: training transform on train/; val: eval transform on val/")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (0 = in this process)")
    parser.add_argument("--images", type=int, default=512, help="images timed per pipeline and repeat")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every pipeline")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"some of {', '.join(PIPELINES)}")
    parser.add_argument("--jpeg-decoder", choices=("auto",) + JPEG_DECODERS, default="auto",
                        help="the project's JPEG decoder (data.jpeg_decoder)")
    parser.add_argument("--split-images", type=int, default=200, help="images the time split is measured on")
    parser.add_argument("--compare-resize", action="store_true",
                        help="also time the C resize, Pillow's and torch's uint8 antialiased interpolate on the "
                             "fused path's crops of the --split-images images, and compare torch's pixels")
    parser.add_argument("--make-test-images", metavar="DIR", type=Path,
                        help="write an ImageNet-sized JPEG set to DIR from --source, then exit")
    parser.add_argument("--source", default="fashion-mnist",
                        help="--make-test-images: CIFAR-10 tar/folder, or fashion-mnist")
    parser.add_argument("--count", type=int, default=1000, help="--make-test-images: training images (val: 1/5)")
    parser.add_argument("--style", choices=("resized", "mosaic"), default="resized",
                        help="--make-test-images: one source image scaled up, or source images tiled at native size")
    parser.add_argument("--seed", type=int, default=0,
                        help="--make-test-images: what it draws; a benchmark: which images the time split uses")
    args = parser.parse_args(argv)
    if args.make_test_images is None and not args.data:
        parser.error("give --data PATH (or --make-test-images DIR)")
    for name in ("resolution", "images", "batch_size", "repeats", "split_images", "count"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        parser.error(f"--workers must be non-negative, got {args.workers}")
    unknown = [p for p in args.pipelines.split(",") if p and p not in PIPELINES]
    if unknown or not args.pipelines.strip(","):
        parser.error(f"--pipelines: {args.pipelines!r}; expected some of {', '.join(PIPELINES)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def job() -> None:
        if args.make_test_images is not None:
            summary = make_test_images(args.make_test_images, args.source, args.count, args.style, args.seed)
            print(json.dumps({"test_images": str(args.make_test_images), "style": args.style, "source": args.source,
                              **summary}), flush=True)
            return
        print(json.dumps({"host": machine(args.jpeg_decoder)}), flush=True)
        for line in run_benchmark(args):
            print(json.dumps(line), flush=True)

    return run_guarded(job)  # data errors: one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
