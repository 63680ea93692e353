"""Host preprocessing: an opened (not yet decoded) PIL image → uint8 tensor [3, S, S]. No float normalisation: the
model does that on the device, so the host ships 8-bit images (4x less IO than float32, as in Graphcore's recipe).

``train``: Inception crop (torchvision's ``RandomResizedCrop`` distribution) + flip (+ RandAugment); ``eval``:
resize the shorter side to floor(S / crop_pct) (``data.eval_crop_pct``, 0.875 = 256/224) with
``data.interpolation`` and keep the centre S x S. Both decode JPEGs at the coarsest DCT scale the crop allows (see
:mod:`data.decode` and docs/data.md).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from data.base import to_rgb
from data.config import DataConfig
from data.decode import (
    Box,
    DecoderChain,
    choose_decoders,
    crop_and_resize,
    random_resized_crop_box,
    resize_then_center_crop_box,
)
from data.errors import DataError
from data.seeding import derive_seed, torch_rng_seeded

PreprocessingKind = Literal["train", "eval"]
#: ``data.interpolation`` -> Pillow's filter (the eval resize; torchvision's and timm's names).
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def eval_resize(resolution: int, crop_pct: float) -> int:
    """The shorter side before the eval centre crop: ``floor(S / crop_pct)`` as timm computes it (224 at 0.875:
    256, torchvision's ``Resize(256)``)."""
    return math.floor(resolution / crop_pct)


def image_to_tensor(image: Image.Image, *, mirror: bool = False) -> torch.Tensor:
    """An RGB (or RGBX) image as a contiguous [3, H, W] uint8 tensor, mirrored left to right if asked: Pillow's raw
    pixels, then one strided copy into channel-first order, which measured 3x faster than splitting the bands and
    flipping in Pillow."""
    if image.mode not in ("RGB", "RGBX"):
        raise ValueError(f"image_to_tensor takes RGB or RGBX images, got mode {image.mode!r}")
    pixels = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(image.height, image.width, -1)
    if mirror:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(pixels[:, :, :3].transpose(2, 0, 1)))


@dataclass(frozen=True)
class Preprocessing:
    """One phase's transform, as plain settings (cheap to build, compare and pickle into workers).

    The random choices of a sample (crop box, flip) come from :meth:`draws`, a :class:`random.Random` seeded by
    the sample's key, so they are a function of (seed, epoch, index) whichever process decodes it.
    """

    kind: PreprocessingKind
    resolution: int
    crop_scale: Tuple[float, float] = (0.05, 1.0)
    crop_ratio: Tuple[float, float] = (0.75, 1.3333)
    hflip: bool = True
    randaugment: int = 0  # magnitude (of 30 bins) for 2 ops; 0 = off
    #: The fused decode's JPEG decoders, chosen once (see data.decode); None: every file decoded in full.
    decoders: Optional[DecoderChain] = field(default_factory=functools.partial(choose_decoders, "auto"))
    crop_pct: float = 0.875  # eval: centre crop share of the resized shorter side
    interpolation: str = "bilinear"  # eval: the resize filter (a key of RESAMPLE)

    @property
    def fused_decode(self) -> bool:
        return self.decoders is not None

    def draws(self, seed: Optional[int]) -> random.Random:
        """The sample's random stream: from its key's seed, or (plain int indexing) from the ambient torch RNG
        like any torchvision data set."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        return random.Random(seed)

    def box(self, width: int, height: int, draws: random.Random) -> Box:
        """The source region the output shows: a random Inception crop, or the eval transform's centre."""
        if self.kind == "train":
            return random_resized_crop_box(draws, width, height, self.crop_scale, self.crop_ratio)
        return resize_then_center_crop_box(width, height, eval_resize(self.resolution, self.crop_pct),
                                           self.resolution)

    def region(self, image: Image.Image, draws: random.Random) -> Image.Image:
        """Decode ``image`` and cut the S x S region (RGB or RGBX); where corrupt files fail (a ``DECODE_ERRORS``)."""
        train = self.kind == "train"
        return crop_and_resize(image, self.box(image.width, image.height, draws), self.resolution,
                               clip_to_box=train, decoders=self.decoders,
                               resample=RESAMPLE["bilinear" if train else self.interpolation])

    def finish(self, region: Image.Image, draws: random.Random, seed: Optional[int]) -> torch.Tensor:
        """Flip and RandAugment (training only), then the tensor. Without RandAugment the flip happens in the
        copy to the tensor (same pixels, one copy fewer)."""
        mirror = self.kind == "train" and self.hflip and draws.random() < 0.5
        if self.kind == "train" and self.randaugment:
            if mirror:
                region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mirror = False
            # torchvision's RandAugment draws from the global torch RNG: seed it from the key too.
            with torch_rng_seeded(None if seed is None else derive_seed(seed, 1)):
                region = self._randaugment(to_rgb(region))
        return image_to_tensor(region, mirror=mirror)

    def __call__(self, image: Image.Image, seed: Optional[int] = None) -> torch.Tensor:
        draws = self.draws(seed)
        return self.finish(self.region(image, draws), draws, seed)

    @functools.cached_property
    def _randaugment(self) -> transforms.RandAugment:
        return transforms.RandAugment(num_ops=2, magnitude=self.randaugment,
                                      interpolation=transforms.InterpolationMode.BILINEAR)


def build_transform(preprocessing: PreprocessingKind, resolution: int, cfg: DataConfig,
                    randaugment: Optional[float] = None) -> Preprocessing:
    """The ``train`` or ``eval`` transform at ``resolution`` with ``cfg``'s crop, flip and decode settings.
    ``randaugment`` overrides ``cfg.randaugment`` (progressive learning ramps it)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}")
    if preprocessing not in ("train", "eval"):
        raise DataError(f"preprocessing must be 'train' or 'eval', got {preprocessing!r}")
    magnitude = cfg.randaugment if randaugment is None else randaugment
    # Choosing the decoders loads the C helpers they use here, so that forked loader workers inherit them.
    decoders = choose_decoders(cfg.jpeg_decoder) if cfg.fused_decode else None
    return Preprocessing(preprocessing, resolution, crop_scale=tuple(cfg.crop_scale),  # type: ignore[arg-type]
                         crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip,  # type: ignore[arg-type]
                         randaugment=int(round(magnitude)) if magnitude and preprocessing == "train" else 0,
                         decoders=decoders, crop_pct=cfg.eval_crop_pct,
                         interpolation=cfg.interpolation)
