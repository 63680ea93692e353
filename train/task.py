"""The model wrapper every backend runs: uint8 images in, loss and accuracy counts out.

PopTorch needs the loss computed inside ``forward``, and Graphcore feeds 8-bit images to save host-to-device
bandwidth; doing both here keeps the torch and IPU backends identical.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .mixing import apply_mix

# ImageNet mean/std in 0..255 units: normalisation happens on the device after the uint8 transfer.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class ClassificationTask(nn.Module):
    """``forward(images_uint8, labels[, mix]) -> (loss, top1_correct, top5_correct)``.

    ``mark_loss`` wraps the loss (``poptorch.identity_loss`` on IPUs). ``dtype`` is the input dtype the model
    expects (half for IPU 16.x precision). Accuracy is counted against the unmixed labels. ``frozen`` modules
    (fine-tuning) stay in eval mode whatever mode the task is put in.
    """

    def __init__(self, model: nn.Module, num_classes: int, label_smoothing: float = 0.0,
                 mark_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 frozen: Sequence[nn.Module] = ()):
        super().__init__()
        self.model = model
        self.frozen = list(frozen)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mark_loss = mark_loss
        self.dtype = dtype
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ClassificationTask":
        """Frozen layers stay in eval mode: no dropout, stochastic depth or BatchNorm updates there."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.get_buffer("mean")) * self.get_buffer("inv_std")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Label-smoothed one-hot targets ``[N, classes]``."""
        smooth = self.label_smoothing
        return F.one_hot(labels, self.num_classes).float() * (1 - smooth) + smooth / self.num_classes

    @staticmethod
    def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of fp32 logits against soft targets, one value per sample."""
        return -(targets * F.log_softmax(logits, dim=1)).sum(1)

    def hits(self, logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sample booleans: the label is the top-1 class, the label is among the top 5."""
        top5 = logits.topk(min(5, self.num_classes), dim=1).indices == labels[:, None]
        return top5[:, 0], top5.any(1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                mix: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.normalize(images)
        targets = self.targets(labels)
        if mix is not None:
            x, targets = apply_mix(x, targets, mix.to(x.device))
        logits = self.model(x).float()
        loss = self.per_sample_loss(logits, targets).mean()
        if self.mark_loss is not None:
            loss = self.mark_loss(loss)
        top1, top5 = self.hits(logits, labels)
        return loss, top1.sum().float(), top5.sum().float()
