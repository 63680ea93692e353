"""Crop geometry and the fused crop + scaled JPEG decode (see docs/data.md, "Fused crop + scaled decode").

The crop box is drawn first, from the file's header alone, and then the image is decoded only as finely as the
box needs: libjpeg can run its inverse DCT at 1/2, 1/4 or 1/8 scale, which skips most of the per-pixel work
(inverse DCT, colour conversion, upsampling, and the resize that follows) when the crop is large compared with
the output. The box distribution is torchvision's ``RandomResizedCrop`` exactly; only the random numbers come
from a keyed :class:`random.Random` instead of the global torch RNG.

The decoder is libjpeg-turbo in every case; each route is a :class:`JpegDecoder` object, and a transform holds
the chain of them that ``data.jpeg_decoder`` names, chosen once (:func:`choose_decoders`; all give the same
pixels):

- :class:`RegionDecoder`: only the crop's rows and iMCU columns (:mod:`data.jpeg_region`, a small C library
  built at set-up); it declines a crop that needs the whole frame (every eval box);
- :class:`SimplejpegDecoder`: the whole frame, into an RGBX array;
- :class:`PillowDecoder`: the whole frame through Pillow's ``draft()``, the zero-dependency route. It takes
  every file, so it ends every chain: a file a fast decoder declines (a libjpeg warning or error anywhere in the
  file) goes to Pillow, and fails or passes exactly as it would there.

Every decoder's pixels are resized by :mod:`data.resample` (Pillow's resize, in C, with Pillow's pixels).
"""

from __future__ import annotations

import abc
import functools
import math
import random
import sys
from dataclasses import dataclass
from io import BytesIO
from typing import ClassVar, NamedTuple, Optional, Set, Tuple

import numpy as np
from PIL import Image

from data import jpeg_region
from data.base import to_rgb
from data.errors import DataError
from data.resample import resize_rgbx
from data.resample import unavailable_reason as c_resize_unavailable

try:
    import simplejpeg
except ImportError:  # an accelerator, not a requirement: Pillow decodes the same pixels, a little slower
    simplejpeg = None

DCT_SCALES = (8, 4, 2)  # what libjpeg's scaled inverse DCT offers below full size, largest first
CROP_TRIES = 10  # torchvision's RandomResizedCrop: attempts before its central-crop fallback


class Box(NamedTuple):
    """A region of the source image in its own pixel coordinates (floats: eval boxes are fractional)."""

    left: float
    top: float
    width: float
    height: float

    def scaled(self, factor: float) -> Tuple[float, float, float, float]:
        """``(left, top, right, bottom)`` in an image ``factor`` times smaller."""
        return (self.left / factor, self.top / factor, (self.left + self.width) / factor,
                (self.top + self.height) / factor)


def random_resized_crop_box(rng: random.Random, width: int, height: int, scale: Tuple[float, float],
                            ratio: Tuple[float, float]) -> Box:
    """torchvision's ``RandomResizedCrop.get_params``, step for step: area fraction uniform in ``scale``,
    aspect ratio log-uniform in ``ratio``, rounded to whole pixels, up to 10 tries, then the central crop
    with the aspect ratio clamped into ``ratio``."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return Box(left, top, w, h)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return Box((width - w) // 2, (height - h) // 2, w, h)


def resize_then_center_crop_box(width: int, height: int, resize_to: int, resolution: int) -> Box:
    """The source region that torchvision's ``Resize(resize_to)`` (shorter side) then ``CenterCrop(resolution)``
    keeps, with their rounding: the longer side becomes ``int(resize_to * long / short)``, the crop offset
    ``round((size - resolution) / 2)``."""
    if width <= height:
        new_w, new_h = resize_to, int(resize_to * height / width)
    else:
        new_w, new_h = int(resize_to * width / height), resize_to
    left, top = int(round((new_w - resolution) / 2)), int(round((new_h - resolution) / 2))
    sx, sy = width / new_w, height / new_h
    return Box(left * sx, top * sy, resolution * sx, resolution * sy)


def dct_scale(box: Box, resolution: int) -> int:
    """The largest DCT scale that still leaves the box at least ``resolution`` pixels on both sides, so the
    resize after it only ever shrinks (never upsamples what the scaled decode threw away)."""
    for factor in DCT_SCALES:
        if box.width / factor >= resolution and box.height / factor >= resolution:
            return factor
    return 1


def can_decode_scaled(image: Image.Image) -> bool:
    """A baseline (sequential) colour JPEG, the common case that libjpeg scales cheaply. Progressive, grey,
    CMYK and other odd files, and every other format, take the plain path (full decode, then ``to_rgb``)."""
    return (image.format == "JPEG" and image.mode == "RGB" and len(getattr(image, "tile", ())) == 1
            and not image.info.get("progressive") and not image.info.get("progression"))


class Crop:
    """What a decoder is asked for: ``box`` of the opened (not yet decoded) plain colour JPEG ``image``, for an
    output ``resolution`` pixels square; ``clip_to_box``: as in :func:`crop_and_resize`."""

    def __init__(self, image: Image.Image, box: Box, resolution: int, clip_to_box: bool) -> None:
        self.image, self.box, self.resolution, self.clip_to_box = image, box, resolution, clip_to_box
        self.scale = dct_scale(box, resolution)

    @functools.cached_property
    def data(self) -> Optional[bytes]:
        """The file's bytes where they are in memory (the fast decoders need them), else None; read once."""
        source = getattr(self.image, "fp", None)
        return source.getvalue() if isinstance(source, BytesIO) else None

    def scaled_size(self) -> Tuple[int, int]:
        """The image's width and height decoded at :attr:`scale` (libjpeg rounds up)."""
        return -(-self.image.width // self.scale), -(-self.image.height // self.scale)


class Region(NamedTuple):
    """Decoded pixels (RGBX, [H, W, 4] uint8 with contiguous rows) and the box in them that the resize maps onto
    the output (fractional, in their own coordinates)."""

    pixels: np.ndarray
    box: Tuple[float, float, float, float]


class JpegDecoder(abc.ABC):
    """One way to decode a crop. Implementations are frozen dataclasses without fields: they compare equal by
    type and pickle into loader workers, which load what a decoder needs themselves (or inherit it by fork)."""

    name: ClassVar[str]  # the data.jpeg_decoder value, for reports

    def unavailable(self) -> str:
        """Empty where this decoder works on this machine, else one line saying why not."""
        return ""

    @abc.abstractmethod
    def decode(self, crop: Crop) -> Optional[Region]:
        """``crop``'s pixels at :attr:`Crop.scale`, or None: not this file, the next decoder decides."""


@dataclass(frozen=True)
class RegionDecoder(JpegDecoder):
    """Only the part of the frame the resize reads (:mod:`data.jpeg_region`). It declines a crop that needs the
    whole frame (simplejpeg's newer libjpeg-turbo decodes whole frames faster), a file whose bytes are not in
    memory, and a file libjpeg warns about or rejects anywhere (it reads the whole file to know)."""

    name: ClassVar[str] = "region"

    def unavailable(self) -> str:
        return jpeg_region.unavailable_reason()

    def decode(self, crop: Crop) -> Optional[Region]:
        scaled = crop.scaled_size()
        region = crop.box.scaled(crop.scale)
        rect = _enclosing_rect(region, scaled, crop.clip_to_box)
        if rect == (0, 0, *scaled) or crop.data is None:
            return None
        pixels = jpeg_region.decode_region(crop.data, crop.scale, rect)
        return None if pixels is None else Region(pixels, _inside(region, rect))


@dataclass(frozen=True)
class SimplejpegDecoder(JpegDecoder):
    """The whole frame by simplejpeg's libjpeg-turbo, into an RGBX array. It declines a file whose bytes are not in
    memory, one that raises any libjpeg warning, and a process without simplejpeg (a worker on another host)."""

    name: ClassVar[str] = "simplejpeg"

    def unavailable(self) -> str:
        return "" if simplejpeg is not None else "simplejpeg is not installed (pip install simplejpeg)"

    def decode(self, crop: Crop) -> Optional[Region]:
        if simplejpeg is None or crop.data is None:
            return None
        width, height = crop.scaled_size()
        try:
            pixels = simplejpeg.decode_jpeg(crop.data, "RGBX", min_width=width, min_height=height)
        except ValueError:
            return None
        if pixels.shape[:2] != (height, width):  # a factor other than 1/scale: let Pillow do it
            return None
        region = crop.box.scaled(crop.scale)
        rect = _enclosing_rect(region, (width, height), crop.clip_to_box)
        return Region(pixels[rect[1]:rect[3], rect[0]:rect[2]], _inside(region, rect))


@dataclass(frozen=True)
class PillowDecoder(JpegDecoder):
    """The whole frame through Pillow's ``draft()``, the zero-dependency route. It takes every file (a corrupt one
    raises Pillow's error), so it ends every :class:`DecoderChain`."""

    name: ClassVar[str] = "pillow"

    def decode(self, crop: Crop) -> Region:
        factor = _decode_with_pillow(crop.image, crop.scale)
        region = crop.box.scaled(factor)
        rect = _enclosing_rect(region, crop.image.size, crop.clip_to_box)
        cut = crop.image if rect == (0, 0, *crop.image.size) else crop.image.crop(rect)
        pixels = np.frombuffer(cut.tobytes("raw", "RGBX"), dtype=np.uint8).reshape(cut.height, cut.width, 4)
        return Region(pixels, _inside(region, rect))


PILLOW = PillowDecoder()
#: Every decoder, in the order ``auto`` tries them; Pillow last, because it takes every file.
DECODERS: Tuple[JpegDecoder, ...] = (RegionDecoder(), SimplejpegDecoder(), PILLOW)
#: ``data.jpeg_decoder`` values other than ``auto``.
JPEG_DECODERS = tuple(decoder.name for decoder in DECODERS)


class DecoderChain(NamedTuple):
    """The decoders a transform tries in turn, chosen once (:func:`choose_decoders`): ``fast`` ones, each of which
    may decline a file, then Pillow, which takes it."""

    fast: Tuple[JpegDecoder, ...]

    @property
    def name(self) -> str:
        """The decoder that answers for the plain JPEGs it can take, for reports."""
        return (self.fast[0] if self.fast else PILLOW).name

    def decode(self, crop: Crop) -> Region:
        for decoder in self.fast:
            region = decoder.decode(crop)
            if region is not None:
                return region
        return PILLOW.decode(crop)


_SAID: Set[str] = set()  # the fallback lines this process has printed


def choose_decoders(name: str) -> DecoderChain:
    """The chain ``data.jpeg_decoder`` ``name`` stands for here: the named decoder (``auto``: the first of
    :data:`DECODERS` that works) and the working ones after it, then Pillow. A named decoder that does not work is
    a :class:`DataError` saying why. What a missing C helper makes the chain fall back to is said once per process,
    in one line on stderr."""
    if name != "auto" and name not in JPEG_DECODERS:
        raise DataError(f"data.jpeg_decoder: {name!r} is not a decoder; expected auto or one of "
                        f"{', '.join(JPEG_DECODERS)}")
    start = 0 if name == "auto" else JPEG_DECODERS.index(name)
    reason = DECODERS[start].unavailable()
    if reason and name != "auto":
        raise DataError(f"data.jpeg_decoder: {name!r} is not available here: {reason} (auto picks what works)")
    chain = DecoderChain(tuple(d for d in DECODERS[start:-1] if not d.unavailable()))
    fallbacks = []
    if start == 0 and reason:
        fallbacks.append(f"the JPEG region decoder is not available ({reason}): crops decode whole frames "
                         f"through {chain.name}")
    if c_resize_unavailable():
        fallbacks.append(f"the C resize is not available ({c_resize_unavailable()}): Pillow resizes")
    line = "; ".join(fallbacks)
    if line and line not in _SAID:
        _SAID.add(line)
        print(f"note: {line} (same pixels, slower)", file=sys.stderr, flush=True)
    return chain


def crop_and_resize(image: Image.Image, box: Box, resolution: int, *, clip_to_box: bool,
                    decoders: Optional[DecoderChain], resample: int = Image.Resampling.BILINEAR) -> Image.Image:
    """``box`` of the (not yet decoded) ``image`` resized to ``resolution`` x ``resolution``: an RGB image, or RGBX
    (the same pixels plus a padding byte, the decoders' layout, which is also how Pillow stores RGB).

    ``clip_to_box``: the resize filter sees only the box (torchvision's crop-then-resize, the training crop);
    otherwise it may reach past the box edges like a resize of the whole image followed by a crop (the eval
    transform). ``resample`` is Pillow's filter (bilinear, or bicubic for the eval transform). With ``decoders``
    (the fused decode) a plain JPEG is decoded at :func:`dct_scale`, which only ever leaves a downscale for the
    filter, and resized by :mod:`data.resample`, which gives Pillow's pixels; without (``None``), or for any other
    file, the image is decoded in full (the plain path). At scale 1, and on the plain path, the pixels are
    exactly torchvision's.
    """
    if decoders is not None and can_decode_scaled(image):
        region = decoders.decode(Crop(image, box, resolution, clip_to_box))
        return resize_rgbx(region.pixels, (resolution, resolution), resample, region.box)
    image = to_rgb(image)
    whole = box.scaled(1)
    rect = _enclosing_rect(whole, image.size, clip_to_box)
    cut = image if rect == (0, 0, *image.size) else image.crop(rect)
    return cut.resize((resolution, resolution), resample, box=_inside(whole, rect))


def _inside(region: Tuple[float, float, float, float], rect: jpeg_region.Rect) -> Tuple[float, float, float, float]:
    """``region`` of the decoded frame in the coordinates of its cut ``rect``: the resize's box."""
    return (region[0] - rect[0], region[1] - rect[1], region[2] - rect[0], region[3] - rect[1])


def _enclosing_rect(region: Tuple[float, float, float, float], size: Tuple[int, int],
                    clip_to_box: bool) -> jpeg_region.Rect:
    """The whole decoded pixels the resize reads: those under ``region`` when the filter is clipped to the box,
    else the whole image (the filter may reach past the box)."""
    if not clip_to_box:
        return (0, 0, size[0], size[1])
    return (int(region[0]), int(region[1]), min(math.ceil(region[2]), size[0]), min(math.ceil(region[3]), size[1]))


def _decode_with_pillow(image: Image.Image, scale: int) -> float:
    """Decode ``image`` in place at ``scale``; returns the scale Pillow applied."""
    factor = 1.0
    if scale > 1:
        width = image.width
        # Asking for (size // scale) makes Pillow pick exactly ``scale``; it answers with the source's extent in
        # decoded pixels, (0, 0, width / scale, height / scale).
        drafted = image.draft(image.mode, (image.width // scale, image.height // scale))
        if drafted is not None:
            factor = width / drafted[1][2]
    image.load()
    return factor
