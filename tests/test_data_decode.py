"""The fused crop + scaled JPEG decode against torchvision, on real JPEGs made from the shared CIFAR-10 images
(ImageNet-sized, as ``python -m bench.data --make-test-images`` writes them)."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

import data.decode as decode
from bench.data import make_test_images
from conftest import REPO_ROOT, needs_c_resize, needs_jpeg_region
from data import DataConfig, DataError, build_dataset, build_transform, jpeg_region, resample
from data.decode import Box, can_decode_scaled, dct_scale, random_resized_crop_box, resize_then_center_crop_box
from data.native import BuildError
from data.transforms import image_to_tensor

BILINEAR = transforms.InterpolationMode.BILINEAR
SCALE, RATIO = (0.05, 1.0), (0.75, 1.3333)


@pytest.fixture(scope="module")
def jpeg_sets(shared_cifar_tarball, tmp_path_factory) -> List[Path]:
    """Two real-image sets: CIFAR-10 photos scaled up (smooth) and tiled at native size (detailed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFNET_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        sets = []
        for style in ("resized", "mosaic"):
            root = tmp_path_factory.mktemp(style)
            make_test_images(root, str(shared_cifar_tarball), count=20, style=style, seed=1)
            sets.append(root)
    return sets


def jpeg_files(roots: List[Path]) -> List[bytes]:
    return [p.read_bytes() for root in roots for p in sorted(root.glob("train/*/*.jpg"))]


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# ------------------------------------------------------------------------------------------ distribution
def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the two empirical CDFs."""
    pooled = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), pooled, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), pooled, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def box_features(boxes: List[Tuple[float, float, float, float]], width: int, height: int) -> np.ndarray:
    """Area fraction, log aspect ratio, and horizontal/vertical centre of each (left, top, w, h) box."""
    b = np.array(boxes, dtype=np.float64)
    return np.stack([b[:, 2] * b[:, 3] / (width * height), np.log(b[:, 2] / b[:, 3]),
                     (b[:, 0] + b[:, 2] / 2) / width, (b[:, 1] + b[:, 3] / 2) / height], axis=1)


def uniform_ratio_box(rng: random.Random, width: int, height: int, scale, ratio) -> Box:
    """A plausible-looking wrong sampler (aspect ratio uniform, not log-uniform): the test must reject it."""
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = rng.uniform(*ratio)
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return Box(rng.randint(0, width - w), rng.randint(0, height - h), w, h)
    return Box(0, 0, width, height)


@pytest.mark.slow
@pytest.mark.parametrize("width, height", [(500, 375), (640, 160)])  # 640x160: the central fallback is common
def test_crop_boxes_have_torchvision_random_resized_crop_distribution(width, height):
    n = 20000
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    theirs = [transforms.RandomResizedCrop.get_params(image, SCALE, RATIO) for _ in range(n)]
    theirs_boxes = [(j, i, w, h) for i, j, h, w in theirs]
    rng = random.Random(1)
    ours = [tuple(random_resized_crop_box(rng, width, height, SCALE, RATIO)) for _ in range(n)]
    bad_rng = random.Random(2)
    wrong = [tuple(uniform_ratio_box(bad_rng, width, height, SCALE, RATIO)) for _ in range(n)]
    a, b, c = (box_features(x, width, height) for x in (theirs_boxes, ours, wrong))
    limit = 1.95 * math.sqrt(2 / n)  # the two-sample KS critical value at a 0.1% false-alarm rate
    for k, name in enumerate(("area fraction", "log aspect", "x centre", "y centre")):
        assert ks_statistic(a[:, k], b[:, k]) < limit, name
    assert ks_statistic(a[:, 1], c[:, 1]) > limit  # the test has the power to see a wrong aspect law
    fallback = lambda boxes: np.mean([w == width or h == height for _, _, w, h in boxes])  # noqa: E731
    assert abs(fallback(theirs_boxes) - fallback(ours)) < 4 * math.sqrt(0.25 / n) + 1e-9


# ------------------------------------------------------------------------------------------------ pixels
def torchvision_train(image: Image.Image, box: Box, size: int) -> torch.Tensor:
    crop = F.resized_crop(image.convert("RGB"), int(box.top), int(box.left), int(box.height), int(box.width),
                          [size, size], BILINEAR)
    return F.pil_to_tensor(crop)


def torchvision_eval(image: Image.Image, size: int) -> torch.Tensor:
    pipeline = transforms.Compose([transforms.Resize(int(size * 256 / 224), interpolation=BILINEAR),
                                   transforms.CenterCrop(size), transforms.PILToTensor()])
    return pipeline(image.convert("RGB"))


def region(data: bytes, box: Box, size: int, fused: bool, clip: bool = True, decoder: str = "auto") -> torch.Tensor:
    return image_to_tensor(decode.crop_and_resize(opened(data), box, size, clip_to_box=clip,
                                                  decoders=decode.choose_decoders(decoder) if fused else None))


def sample_boxes(files: List[bytes], size: int, per_file: int) -> List[Tuple[bytes, Box]]:
    rng = random.Random(size)
    out = []
    for data in files:
        width, height = opened(data).size
        out += [(data, random_resized_crop_box(rng, width, height, SCALE, RATIO)) for _ in range(per_file)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 160])
def test_train_crop_equals_torchvision_on_the_plain_path_and_at_dct_scale_1(jpeg_sets, size):
    scales = []
    for data, box in sample_boxes(jpeg_files(jpeg_sets), size, per_file=3):
        reference = torchvision_train(opened(data), box, size)
        assert torch.equal(region(data, box, size, fused=False), reference)
        scales.append(dct_scale(box, size))
        if scales[-1] == 1:
            assert torch.equal(region(data, box, size, fused=True), reference)
    assert scales.count(1) >= 10 and len(set(scales)) >= 2


@pytest.mark.parametrize("size", [64, 224])
def test_eval_crop_matches_torchvision_resize_and_centre_crop(jpeg_sets, size):
    """The eval box is fractional, so Pillow's filter centres come out of a different floating-point sum than in
XX
    (docs/data.md). At DCT scale 1 fused and plain are identical."""
    exact_scale_1, off, values = 0, 0, 0
    for data in jpeg_files(jpeg_sets):
        width, height = opened(data).size
        box = resize_then_center_crop_box(width, height, int(size * 256 / 224), size)
        plain = region(data, box, size, fused=False, clip=False)
        gap = (plain.int() - torchvision_eval(opened(data), size).int()).abs()
        assert gap.max() <= 1
        off, values = off + int((gap > 0).sum()), values + gap.numel()
        if dct_scale(box, size) == 1:
            assert torch.equal(region(data, box, size, fused=True, clip=False), plain)
            exact_scale_1 += 1
    assert off / values < 0.02 and exact_scale_1 >= (5 if size == 224 else 0)  # at 64 every box scales


def box_prefiltered(data: bytes, box: Box, size: int, scale: int) -> torch.Tensor:
    """The ideal of a DCT-scaled decode: the full decode averaged over scale x scale blocks, then the same crop
    and resize as the fused path."""
    reduced = opened(data).convert("RGB").reduce(scale)
    left, top, right, bottom = box.scaled(scale)
    whole = (int(left), int(top), min(math.ceil(right), reduced.width), min(math.ceil(bottom), reduced.height))
    crop = reduced.crop(whole)
    out = crop.resize((size, size), Image.BILINEAR,
                      box=(left - whole[0], top - whole[1], right - whole[0], bottom - whole[1]))
    return image_to_tensor(out)


def test_scaled_decode_differs_from_full_decode_only_as_a_box_prefilter_does(jpeg_sets):
    """The bound (docs/data.md): per image, the mean |fused - plain| is at most 1.5 x that of the same crop
    box-averaged by the scale before its resize, plus 0.25 levels; and fused is within 1.5 levels (mean) of
    that box-averaged image. Measured worst cases: 1.22x and 1.04 levels."""
    seen = set()
    for size in (48, 96, 160):
        for data, box in sample_boxes(jpeg_files(jpeg_sets), size, per_file=2):
            scale = dct_scale(box, size)
            if scale == 1:
                continue
            seen.add(scale)
            plain = region(data, box, size, fused=False).float()
            fused = region(data, box, size, fused=True).float()
            ideal = box_prefiltered(data, box, size, scale).float()
            assert (fused - plain).abs().mean() <= 1.5 * (ideal - plain).abs().mean() + 0.25
            assert (fused - ideal).abs().mean() <= 1.5
    assert {2, 4, 8} <= seen


# ------------------------------------------------------------------------------------------- odd files
def encode(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, **options)
    return out.getvalue()


def test_odd_files_take_the_plain_path(jpeg_sets):
    photo = opened(jpeg_files(jpeg_sets)[0]).convert("RGB")
    odd = {
        "progressive": encode(photo, format="JPEG", quality=90, progressive=True),
        "grey": encode(photo.convert("L"), format="JPEG", quality=90),
        "cmyk": encode(photo.convert("CMYK"), format="JPEG", quality=90),
        "png": encode(photo, format="PNG"),
    }
    box = Box(0, 0, photo.width, photo.height)
    size = min(photo.size) // 4  # a DCT scale of 4 would apply to a plain JPEG
    assert dct_scale(box, size) == 4 and can_decode_scaled(opened(encode(photo, format="JPEG")))
    for name, data in odd.items():
        assert not can_decode_scaled(opened(data)), name
        assert torch.equal(region(data, box, size, fused=True), torchvision_train(opened(data), box, size)), name


def needs_decoder(name: str) -> None:
    if name == "region":
        needs_jpeg_region()
    elif name == "simplejpeg":
        pytest.importorskip("simplejpeg")


def variants(photo: Image.Image) -> List[bytes]:
    """The chroma layouts libjpeg upsamples differently (4:2:0, 4:2:2, 4:4:4), also at a size that leaves partial
    iMCUs on the right and bottom edges."""
    odd = photo.crop((0, 0, photo.width - 5, photo.height - 3))
    return [encode(image, format="JPEG", quality=q, subsampling=sub) for image in (photo, odd)
            for q, sub in ((90, 2), (80, 1), (95, 0))]


def test_region_decode_equals_the_same_region_of_a_full_decode_at_every_dct_scale(jpeg_sets):
    """Pixel for pixel against Pillow's full decode at that scale, on random rectangles (edges and single rows
    or columns included): where the decoder crops columns, smooth chroma upsampling needs the neighbouring
    iMCU, which jpeg_region.c asks for (docs/data.md)."""
    needs_jpeg_region()
    rng = random.Random(0)
    checked = 0
    for data in jpeg_files(jpeg_sets)[:6] + variants(opened(jpeg_files(jpeg_sets)[0]).convert("RGB")):
        for scale in (1, 2, 4, 8):
            image = opened(data)
            image.draft("RGB", (image.width // scale, image.height // scale))
            full = np.asarray(image.convert("RGB"))
            height, width = full.shape[:2]
            edges = [(1, 1, 0, 0), (width, 1, 0, height - 1), (1, height, width - 1, 0), (width, height, 0, 0)]
            for k in range(10):
                w, h, left, top = edges[k] if k < len(edges) else (rng.randint(1, width), rng.randint(1, height),
                                                                   None, None)
                left = rng.randint(0, width - w) if left is None else left
                top = rng.randint(0, height - h) if top is None else top
                pixels = jpeg_region.decode_region(data, scale, (left, top, left + w, top + h))
                assert pixels is not None and (pixels[:, :, 3] == 255).all()
                np.testing.assert_array_equal(pixels[:, :, :3], full[top:top + h, left:left + w])
                checked += 1
    assert checked == 4 * 10 * 12


@pytest.mark.parametrize("size, clip", [(64, True), (160, True), (224, False)])
def test_every_jpeg_decoder_gives_the_same_pixels(jpeg_sets, size, clip, monkeypatch):
    """region, simplejpeg and Pillow, through the whole crop + resize, for training and eval boxes; training crops
    must really have gone through the region decoder, and every decoder's crops through the C resize."""
    needs_jpeg_region()
    needs_c_resize()
    fast = ["region"] + (["simplejpeg"] if decode.simplejpeg is not None else [])
    regions, resizes = [], []
    decode_region, c_resize = jpeg_region.decode_region, resample._call
    monkeypatch.setattr(jpeg_region, "decode_region", lambda *args: regions.append(args) or decode_region(*args))
    monkeypatch.setattr(resample, "_call", lambda *args: resizes.append(args[2:]) or c_resize(*args))
    if clip:
        samples = sample_boxes(jpeg_files(jpeg_sets), size, per_file=2)
    else:
        samples = [(data, resize_then_center_crop_box(*opened(data).size, int(size * 256 / 224), size))
                   for data in jpeg_files(jpeg_sets)]
    for data, box in samples:
        expected = region(data, box, size, fused=True, clip=clip, decoder="pillow")
        for name in fast:
            assert torch.equal(region(data, box, size, fused=True, clip=clip, decoder=name), expected), name
    assert len(regions) >= (len(samples) // 2 if clip else 0)  # eval boxes need the whole frame: simplejpeg's
    assert len(resizes) == len(samples) * (len(fast) + 1)  # every decoder's crop of every sample


def damaged(data: bytes, rng: random.Random, kind: int) -> bytes:
    """``data`` with one flipped bit, an inserted marker, or 40 zero bytes in the second half of its scan."""
    out = bytearray(data)
    scan = data.find(b"\xff\xda")
    at = rng.randint(scan + (len(data) - scan) // 2, len(data) - 42)
    if kind == 0:
        out[at] ^= 1 << rng.randint(0, 7)
    elif kind == 1:
        out[at:at] = bytes([0xFF, rng.choice([0xC0, 0xC4, 0xD9, 0xDA, 0xDB])])
    else:
        out[at:at + 40] = bytes(40)
    return bytes(out)


def test_damage_below_the_crop_fails_or_passes_as_in_pillow(jpeg_sets):
    """The region decoder stops caring about pixels below the crop, not about the file: it entropy-decodes and
    finishes the rest (docs/data.md), so a damaged file raises where Pillow raises and gives Pillow's pixels
    where Pillow passes, whatever the crop."""
    needs_jpeg_region()
    rng = random.Random(3)
    outcomes = {"raised": 0, "passed": 0}
    for data in jpeg_files(jpeg_sets)[:3] + jpeg_files(jpeg_sets)[-3:]:
        width, height = opened(data).size
        box = Box(10, 10, min(200, width - 20), height // 4)  # the top of the image: the damage is below it
        for k in range(24):
            bad = damaged(data, rng, k % 3)
            results = []
            for name in ("pillow", "region"):
                try:
                    results.append(region(bad, box, 64, fused=True, decoder=name))
                except OSError:
                    results.append(None)
            if results[0] is None:
                assert results[1] is None
                outcomes["raised"] += 1
            else:
                assert results[1] is not None and torch.equal(results[0], results[1])
                outcomes["passed"] += 1
    assert outcomes["raised"] >= 10 and outcomes["passed"] >= 10, outcomes


def test_bytes_after_the_end_marker_change_nothing(jpeg_sets):
    needs_jpeg_region()
    data = jpeg_files(jpeg_sets)[2]
    padded = data + b"trailing bytes"
    np.testing.assert_array_equal(jpeg_region.decode_region(padded, 1, (3, 5, 40, 30)),
                                  jpeg_region.decode_region(data, 1, (3, 5, 40, 30)))
    box = Box(10, 20, 200, 150)
    assert torch.equal(region(padded, box, 64, fused=True, decoder="region"),
                       region(data, box, 64, fused=True, decoder="pillow"))


@pytest.mark.parametrize("decoder", decode.JPEG_DECODERS)
def test_truncated_jpeg_is_named_as_corrupt_with_every_decoder(jpeg_sets, tmp_path, decoder):
    """Also where the crop lies above the cut: the region decoder reads on to the end of the file and declines."""
    needs_decoder(decoder)
    data = jpeg_files(jpeg_sets)[1]
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "whole.jpg").write_bytes(data)
    bad = tmp_path / "train" / "a" / "cut.jpg"
    bad.write_bytes(data[:len(data) * 3 // 4])
    cfg = DataConfig(dataset="imagefolder", path=str(tmp_path), jpeg_decoder=decoder)
    train = build_dataset(cfg, "train", build_transform("train", 32, cfg))
    assert train.transform.decoders.name == decoder
    top_box = Box(0, 0, 64, 32)  # rows that the cut file still has
    if decoder == "region":
        assert jpeg_region.decode_region(bad.read_bytes(), 1, (0, 0, 64, 32)) is None
    with pytest.raises(OSError):
        decode.crop_and_resize(opened(bad.read_bytes()), top_box, 32, clip_to_box=True,
                               decoders=decode.choose_decoders(decoder))
    with pytest.raises(DataError, match=f"corrupt image {bad}"):
        train[0]
    assert train[1][0].shape == (3, 32, 32)


def run_python(tmp_path: Path, code: str, cc: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh process with this ``CC`` and the helpers' cache under ``tmp_path``."""
    env = {**os.environ, "CC": cc, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def recording_compiler(tmp_path: Path) -> Tuple[str, Path]:
    """A ``CC`` that only notes that it was called (and fails), and the file it notes it in."""
    calls = tmp_path / "cc-calls"
    script = tmp_path / "recording-cc"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    script.chmod(0o755)
    return str(script), calls


#: A process that builds the transforms a run builds and says what they decode and resize with.
RUN = ("from data import DataConfig, build_transform, resample\n"
       "for kind in ('train', 'eval', 'train'):\n"
       "    transform = build_transform(kind, 32, DataConfig())\n"
       "print(transform.decoders.name)\n"
       "print(resample.in_use())\n")
BUILD = "from data.build_helpers import main\nmain()\n"


def test_a_run_never_compiles_and_says_once_what_it_falls_back_to(tmp_path):
    """With no helpers built, building transforms (three times) calls no compiler and prints one line, once."""
    cc, calls = recording_compiler(tmp_path)
    done = run_python(tmp_path, RUN, cc)
    assert done.returncode == 0, done.stderr
    assert not calls.exists(), calls.read_text()
    decoder, resize = done.stdout.splitlines()
    assert decoder == ("simplejpeg" if decode.simplejpeg is not None else "pillow")
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("note: the JPEG region decoder is not available (jpeg_region.c is not built"), line
    assert f"crops decode whole frames through {decoder}" in line and "make native" in line, line
    if resample.platform.machine() in resample.CHECKED_MACHINES:
        assert "the C resize is not available (resample.c is not built" in line, line
        assert resize.startswith("Pillow (resample.c is not built"), resize
    env = {**os.environ, "CC": cc, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "train", "--config", "configs/models/efficientnet-b0-g16-ln-pn.yml",
                           "--print-config", "--set", "data.jpeg_decoder=region"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: data.jpeg_decoder: 'region' is not available here: jpeg_region.c is not "
                           "built"), line
    assert not calls.exists(), calls.read_text()


def test_the_set_up_names_a_failed_compile_and_a_run_loads_its_build(tmp_path):
    needs_jpeg_region()
    needs_c_resize()
    broken = run_python(tmp_path, BUILD, "cc -nostdinc")  # no system headers: as if libjpeg-dev were missing
    assert broken.returncode == 0, broken.stderr
    region_line, resize_line = broken.stdout.splitlines()
    assert region_line.startswith("jpeg-region: not built: compiling jpeg_region.c failed"), region_line
    assert resize_line.startswith("resample: not built: compiling resample.c failed"), resize_line
    assert not list((tmp_path / "cache").rglob("*.so*")), "a failed build left files behind"
    cc = os.environ.get("CC", "").strip() or "cc"
    first = run_python(tmp_path, BUILD, cc)
    assert all(" (built with " in line and line.endswith("), checked") for line in first.stdout.splitlines()), \
        first.stdout
    assert "-DEFFNET_LIBJPEG=" in first.stdout  # the libjpeg the set-up found, recorded in the build
    built = [next((tmp_path / "cache" / "effnet-ipu" / name).glob("*.so")) for name in ("jpeg-region", "resample")]
    umask = os.umask(0)
    os.umask(umask)
    for library in built:  # not mkstemp's 0600: a shared cache serves every user
        assert library.stat().st_mode & 0o777 == 0o755 & ~umask, library
    stamps = [library.stat().st_mtime_ns for library in built]
    again = run_python(tmp_path, BUILD, cc)
    assert all(line.endswith(" (already built), checked") for line in again.stdout.splitlines()), again.stdout
    recording, calls = recording_compiler(tmp_path)
    run = run_python(tmp_path, RUN, recording)
    assert run.stdout.splitlines()[0] == "region" and run.stdout.splitlines()[1].startswith("C, "), run.stdout
    assert run.stderr == "" and not calls.exists()
    assert [library.stat().st_mtime_ns for library in built] == stamps  # loaded, not rebuilt


def test_a_build_whose_libjpeg_is_gone_falls_back_with_the_reason(tmp_path, monkeypatch):
    """The region decoder opens the libjpeg the set-up found by its path: where that path no longer holds (the
    package removed, another host), loading says why instead of failing a run."""
    needs_jpeg_region()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gone = dataclasses.replace(jpeg_region.HELPER,
                               found_flags=lambda cc: ['-DEFFNET_LIBJPEG="/nonexistent/libjpeg.so.62"'])
    gone.build()
    library, reason = gone.load(jpeg_region._setup)
    assert library is None and "cannot use the system libjpeg: /nonexistent/libjpeg.so.62" in reason, reason


def test_the_set_up_finds_libjpeg_in_the_compilers_search_dirs(tmp_path):
    """A compiler that answers ``-print-file-name`` with the bare name (as some do when unsure) still leads to the
    library through ``-print-search-dirs``."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libjpeg.so").write_bytes(b"")
    script = tmp_path / "vague-cc"
    script.write_text("#!/bin/sh\ncase \"$1\" in\n  -print-file-name=*) echo libjpeg.so ;;\n"
                      f"  -print-search-dirs) echo 'install: /x'; echo 'libraries: =/nowhere:{tmp_path / 'lib'}' ;;\n"
                      "esac\n")
    script.chmod(0o755)
    assert jpeg_region._system_libjpeg([str(script)]) == str((tmp_path / "lib" / "libjpeg.so").resolve())
    script.write_text("#!/bin/sh\necho libjpeg.so\n")
    with pytest.raises(BuildError, match="the compiler finds no libjpeg.so"):
        jpeg_region._system_libjpeg([str(script)])
