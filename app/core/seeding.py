"""The run's seed, and streams that leave it alone.

``seed_everything`` (``--seed_everything`` in the CLI) decides the model's initialisation;
the data order, Replay's draws and EWC's Fisher samples follow it too unless a callback or
the datamodule is given a seed of its own. Avalanche's generators call
``torch.random.manual_seed(benchmark seed)`` while building a stream, which would make every
run's initialisation the same whatever ``seed_everything`` said: streams are built inside
:func:`preserved_rng`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (splitmix64 chain), so that neighbouring keys such as
    consecutive steps give unrelated random streams. Stateless: the same keys, the same seed."""
    h = 0
    for key in keys:
        z = ((h ^ (key & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``keys``: the same keys (e.g. seed,
    rank, step), the same draws, whichever process or order draws them."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def run_seed(seed: int | None = None) -> int:
    """``seed`` when given, else the run's (``PL_GLOBAL_SEED``, which Lightning's
    ``seed_everything`` sets; 0 without one)."""
    if seed is not None:
        return seed
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the body, then put back the global RNG states (torch CPU, NumPy, Python) it
    changed. Accelerator generators are not touched: streams are built on the CPU."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
