"""Weight averages: the paper's exponential average of per-epoch weights, and a per-step EMA."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


class WeightAverage:
    """``avg <- decay * avg + (1 - decay) * weights``, updated by the loop at its cadence (epoch or step).

    The per-epoch average starts from the first epoch's weights (as the paper averages checkpoints), not from the
    random initialisation, which would otherwise dominate it for many epochs; the per-step EMA starts from the
    initial weights, as timm's does. Buffers without a floating dtype (counters) are copied, not averaged.
    Kept in fp32 on the model's device.
    """

    def __init__(self, decay: float, model: Optional[nn.Module] = None):
        self.decay = decay
        self.state: Dict[str, torch.Tensor] = {}
        if model is not None:
            self.state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if not self.state:
            self.state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
            return
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)
            else:
                self.state[k].copy_(v)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (dtype of the model kept)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.state.items()})
