"""Crop geometry and the fused crop + scaled JPEG decode (see docs/data.md, "Fused crop + scaled decode").

The crop box is drawn first, from the file's header alone, and then the image is decoded only as finely as the
box needs: libjpeg can run its inverse DCT at 1/2, 1/4 or 1/8 scale, which skips most of the per-pixel work
(inverse DCT, colour conversion, upsampling, and the resize that follows) when the crop is large compared with
the output. The box distribution is torchvision's ``RandomResizedCrop`` exactly; only the random numbers come
from a keyed :class:`random.Random` instead of the global torch RNG.

The decoder is libjpeg-turbo in every case (``data.jpeg_decoder``; all give the same pixels):

- ``region``: only the crop's rows and iMCU columns (:mod:`data.jpeg_region`, a small C library built on first
  use), which also skips the pixel work outside the crop; a crop that needs the whole frame (every eval box)
  goes the ``simplejpeg`` way;
- ``simplejpeg``: the whole frame, into an RGBX array;
- ``pillow``: the whole frame through Pillow's ``draft()``, the zero-dependency route.

The first two hand their arrays to :mod:`data.resample` (Pillow's resize, in C, with Pillow's pixels); the
third is resized by Pillow. ``auto`` takes the first of these that works here. A file either fast decoder declines
(a libjpeg warning or error anywhere in the file) goes to Pillow, so it fails or passes exactly as it would there.
"""

from __future__ import annotations

import functools
import math
import random
from io import BytesIO
from typing import NamedTuple, Optional, Tuple

import numpy as np
from PIL import Image

from data import jpeg_region
from data.base import to_rgb
from data.errors import DataError
from data.resample import in_use, resize_rgbx

try:
    import simplejpeg
except ImportError:  # an accelerator, not a requirement: Pillow decodes the same pixels, a little slower
    simplejpeg = None

#: ``data.jpeg_decoder`` values other than ``auto``, in the order ``auto`` tries them.
JPEG_DECODERS = ("region", "simplejpeg", "pillow")

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


def decoder_unavailable(name: str) -> str:
    """Empty where the ``data.jpeg_decoder`` ``name`` works on this machine, else why it does not."""
    if name == "region":
        return jpeg_region.unavailable_reason()
    if name == "simplejpeg" and simplejpeg is None:
        return "simplejpeg is not installed (pip install simplejpeg)"
    return ""


def resize_in_use(decoder: str) -> str:
    """What resizes the crops of the (resolved) ``data.jpeg_decoder`` ``decoder``, for reports."""
    return "Pillow (the pillow decoder)" if decoder == "pillow" else in_use()


@functools.lru_cache(maxsize=None)
def resolve_jpeg_decoder(name: str) -> str:
    """``data.jpeg_decoder`` as the decoder that runs: ``auto`` is the first of :data:`JPEG_DECODERS` available
    here; a named one must be available (:class:`DataError` otherwise, saying why not)."""
    if name == "auto":
        return next(n for n in JPEG_DECODERS if not decoder_unavailable(n))
    if name not in JPEG_DECODERS:
        raise DataError(f"data.jpeg_decoder: {name!r} is not a decoder; expected auto or one of "
                        f"{', '.join(JPEG_DECODERS)}")
    reason = decoder_unavailable(name)
    if reason:
        raise DataError(f"data.jpeg_decoder: {name!r} is not available here: {reason} (auto picks what works)")
    return name


def crop_and_resize(image: Image.Image, box: Box, resolution: int, *, clip_to_box: bool,
                    fused: bool = True, decoder: str = "auto",
                    resample: int = Image.Resampling.BILINEAR) -> Image.Image:
    """``box`` of the (not yet decoded) ``image`` resized to ``resolution`` x ``resolution``: an RGB image, or RGBX
    (the same pixels plus a padding byte, the fast decoders' layout, which is also how Pillow stores RGB).

    ``clip_to_box``: the resize filter sees only the box (torchvision's crop-then-resize, the training crop);
    otherwise it may reach past the box edges like a resize of the whole image followed by a crop (the eval
    transform). ``resample`` is Pillow's filter (bilinear, or bicubic for the eval transform). With ``fused`` and a
    plain JPEG, the decode runs at :func:`dct_scale`, which only ever leaves a downscale for the filter, through
    ``decoder`` (a ``data.jpeg_decoder`` value); at scale 1, or on the plain path, the pixels are exactly
    torchvision's. The fast decoders' arrays are resized by :mod:`data.resample`, which gives Pillow's pixels.
    """
    if fused and can_decode_scaled(image):
        # Only auto is resolved here: a named decoder was checked where the transform was built, and one that is
        # missing in this process (a worker on another host) must not make every file look corrupt.
        decoder = resolve_jpeg_decoder(decoder) if decoder == "auto" else decoder
        source = getattr(image, "fp", None)  # the fast decoders need the bytes in memory
        data = source.getvalue() if decoder != "pillow" and isinstance(source, BytesIO) else None
        if decoder == "region" and data is not None:
            resized = resize_jpeg_region(data, image.size, box, resolution, clip_to_box=clip_to_box,
                                         resample=resample)
            if resized is not None:
                return resized
        scale = dct_scale(box, resolution)
        pixels = _decode_with_simplejpeg(data, image.size, scale)
        if pixels is not None:
            region = box.scaled(scale)
            rect = _enclosing_rect(region, (pixels.shape[1], pixels.shape[0]), clip_to_box)
            return resize_rgbx(pixels[rect[1]:rect[3], rect[0]:rect[2]], (resolution, resolution), resample,
                               _inside(region, rect))
        factor = _decode_with_pillow(image, scale)
    else:
        image, factor = to_rgb(image), 1.0
    region = box.scaled(factor)
    rect = _enclosing_rect(region, image.size, clip_to_box)
    cut = image if rect == (0, 0, *image.size) else image.crop(rect)
    return cut.resize((resolution, resolution), resample, box=_inside(region, rect))


def resize_jpeg_region(data: bytes, size: Tuple[int, int], box: Box, resolution: int, *, clip_to_box: bool,
                       resample: int) -> Optional[Image.Image]:
    """:func:`crop_and_resize` through the region decoder, on a plain JPEG's bytes (``size``: its width and
    height): only the part of the frame the resize reads is decoded, at :func:`dct_scale`. None where that is the
    whole frame (simplejpeg's newer libjpeg-turbo decodes whole frames faster) or the decoder declines."""
    scale = dct_scale(box, resolution)
    scaled = (-(-size[0] // scale), -(-size[1] // scale))
    region = box.scaled(scale)
    rect = _enclosing_rect(region, scaled, clip_to_box)
    if rect == (0, 0, *scaled):
        return None
    pixels = jpeg_region.decode_region(data, scale, rect)
    if pixels is None:
        return None
    return resize_rgbx(pixels, (resolution, resolution), resample, _inside(region, rect))


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


def _decode_with_simplejpeg(data: Optional[bytes], size: Tuple[int, int], scale: int) -> Optional[np.ndarray]:
    """The JPEG ``data`` (``size``: its width and height) decoded by libjpeg-turbo at ``scale`` as an RGBX array
    [H, W, 4], or None where this route does not apply (no simplejpeg, or the bytes are not in memory) or the
    file raises any libjpeg warning: Pillow then decides, so a file fails or passes exactly as it would there."""
    if simplejpeg is None or data is None:
        return None
    width, height = -(-size[0] // scale), -(-size[1] // scale)
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGBX", min_width=width, min_height=height)
    except ValueError:
        return None
    if pixels.shape[:2] != (height, width):  # a factor other than 1/scale: let Pillow do it
        return None
    return pixels
