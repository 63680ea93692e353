"""Host preprocessing: PIL image → uint8 tensor [3, S, S]. No float normalisation: the model does that on the
device, so the host ships 8-bit images (4x less IO than float32, as in Graphcore's recipe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from PIL import Image
from torchvision import transforms

from data.config import DataConfig
from data.errors import DataError

PreprocessingKind = Literal["train", "eval"]


@dataclass(frozen=True)
class Preprocessing:
    """A transform that remembers what it is for, so the generated data set can honour its resolution.

    Cheap to build: the training and fine-tuning phases each build their own and hand it to
    ``dataset.with_transform``.
    """

    kind: PreprocessingKind
    resolution: int
    pipeline: Callable[[Image.Image], torch.Tensor]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image)


def build_transform(preprocessing: PreprocessingKind, resolution: int, cfg: DataConfig,
                    randaugment: Optional[float] = None) -> Preprocessing:
    """``train``: Inception crop (+ flip) (+ RandAugment); ``eval``: resize the shorter side to S·256/224, centre
    crop S. ``randaugment`` overrides ``cfg.randaugment`` (progressive learning ramps it)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}")
    bilinear = transforms.InterpolationMode.BILINEAR
    if preprocessing == "train":
        steps = [transforms.RandomResizedCrop(resolution, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                              interpolation=bilinear)]
        if cfg.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        magnitude = cfg.randaugment if randaugment is None else randaugment
        if magnitude:
            # Two ops at the given magnitude (of 30 bins), EfficientNetV2's setting.
            steps.append(transforms.RandAugment(num_ops=2, magnitude=int(round(magnitude)), interpolation=bilinear))
    elif preprocessing == "eval":
        steps = [transforms.Resize(int(resolution * 256 / 224), interpolation=bilinear),
                 transforms.CenterCrop(resolution)]
    else:
        raise DataError(f"preprocessing must be 'train' or 'eval', got {preprocessing!r}")
    steps.append(transforms.PILToTensor())
    return Preprocessing(preprocessing, resolution, transforms.Compose(steps))
