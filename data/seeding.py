"""Seeds derived from (seed, epoch, index, ...): randomness as a pure function of where we are in a run.

A run resumed mid-epoch must see the same augmented samples as an uninterrupted one. That rules out random
state carried by worker processes (it depends on how many workers ran and what they did before), so every
random choice is made from a seed derived from the run's coordinates instead.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints; stable across processes, platforms and versions.

    ``numpy.random.SeedSequence`` hashes its entropy, so nearby inputs (index 7 vs 8) give unrelated seeds;
    63 bits keep the result valid for ``torch.manual_seed`` and ``random.seed`` alike.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def torch_rng_seeded(seed: Optional[int]) -> Iterator[None]:
    """Run the body with the CPU torch RNG seeded to ``seed``, restoring the caller's RNG afterwards.

    torchvision's v1 random transforms draw from the global CPU generator and take no generator argument,
    so this is how their choices become a function of ``seed``. Only the CPU generator is touched (not
    ``torch.manual_seed``, which would also reseed CUDA). ``None`` leaves the RNG alone.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
