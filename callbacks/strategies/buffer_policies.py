"""Replay-buffer policies by name: which candidates a buffer keeps.

Each candidate sample carries a uniform random weight drawn when it is first offered; a
policy returns the indices of the candidates to keep. Open registry: a new policy is one
function in one file, decorated with :func:`buffer_policy`, then named in
``Replay(policy=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# (weights, labels or None, buffer_size) -> indices of the kept candidates
Select = Callable[[Tensor, Tensor | None, int], Tensor]
BUFFER_POLICIES: dict[str, Select] = {}
NEEDS_LABELS: set[str] = set()


def buffer_policy(name: str, needs_labels: bool = False) -> Callable[[Select], Select]:
    """Register ``select(weights, labels, buffer_size) -> kept indices`` under ``name``;
    ``needs_labels``: the policy reads the samples' class labels.

    Example::

        @buffer_policy("newest_first")
        def newest_first(weights, labels, size):
            return torch.arange(min(size, len(weights)))  # new candidates come first
    """

    def register(select: Select) -> Select:
        BUFFER_POLICIES[name] = select
        if needs_labels:
            NEEDS_LABELS.add(name)
        return select

    return register


@buffer_policy("reservoir")
def reservoir(weights: Tensor, labels: Tensor | None, size: int) -> Tensor:
    """The ``size`` highest weights over everything seen: a uniform sample of the stream so
    far (Avalanche's ``ReservoirSamplingBuffer``)."""
    return weights.argsort(descending=True, stable=True)[:size]


@buffer_policy("class_balanced", needs_labels=True)
def class_balanced(weights: Tensor, labels: Tensor | None, size: int) -> Tensor:
    """``size // n_classes`` per class seen (the remainder to the smallest class ids), a
    reservoir within each class (Avalanche's ``ClassBalancedBuffer``, ``adaptive_size``)."""
    classes = labels.unique(sorted=True)
    quota = [size // len(classes)] * len(classes)
    for i in range(size - sum(quota)):
        quota[i] += 1
    keep = []
    for c, q in zip(classes.tolist(), quota, strict=True):
        members = (labels == c).nonzero().squeeze(1)
        keep.append(members[weights[members].argsort(descending=True, stable=True)[:q]])
    return torch.cat(keep)
