"""Class statistics of labelled features, summed across processes (a torchmetrics ``Metric``),
and the ridge regression the prototype heads solve from them (RanPAC)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

STAT_DTYPE = torch.float64  # sums of many terms: float64, so the order of addition hardly matters


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums ``(C, D)`` of ``features`` ``(N, D)`` and counts ``(C,)``, float64;
    differentiable (a prototypical network trains through its support prototypes)."""
    features = features.to(STAT_DTYPE)
    labels = labels.to(features.device, torch.long)
    sums = features.new_zeros((num_classes, features.shape[1])).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes].to(STAT_DTYPE)
    return sums, counts


def all_reduce_sum(tensor: Tensor, group: Any = None) -> list[Tensor]:
    """torchmetrics' ``dist_sync_fn`` for summed states: one all-reduce, where the default
    all-gathers every process's copy first (a 5000 x 5000 float64 Gram matrix is 200 MB)."""
    reduced = tensor.clone()
    torch.distributed.all_reduce(reduced, group=group)
    return [reduced]  # torchmetrics stacks the list and sums it: the sum of one term


class ClassStatistics(Metric):
    """Statistics of one pass over labelled features, summed across processes on
    ``compute()``: per-class ``sums`` ``(C, D)`` and ``counts`` ``(C,)``; with
    ``projection_dim`` ``M`` also, of projected features ``h`` ``(N, M)`` and one-hot labels
    ``y``, the Gram matrix ``gram = Σ h hᵀ`` ``(M, M)`` and ``cross = Σ h yᵀ`` ``(M, C)``,
    and the same of the held-out samples (``gram_val``, ``cross_val``, ``count_val = Σ‖y‖²``).

    ``compute()`` returns the states (summed over processes under ``torch.distributed``) as
    a dict. All float64.
    """

    full_state_update = False
    is_differentiable = False

    sums: Tensor
    counts: Tensor

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        projection_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dist_sync_fn", all_reduce_sum)
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.projection_dim = projection_dim
        self.add_state("sums", float64_zeros(num_classes, feature_dim), dist_reduce_fx="sum")
        self.add_state("counts", float64_zeros(num_classes), dist_reduce_fx="sum")
        if projection_dim is not None:
            m = projection_dim
            for suffix in ("", "_val"):
                self.add_state(f"gram{suffix}", float64_zeros(m, m), dist_reduce_fx="sum")
                self.add_state(
                    f"cross{suffix}", float64_zeros(m, num_classes), dist_reduce_fx="sum"
                )
            self.add_state("count_val", float64_zeros(), dist_reduce_fx="sum")

    def update(
        self,
        features: Tensor,
        labels: Tensor,
        projected: Tensor | None = None,
        holdout: Tensor | None = None,
    ) -> None:
        """Add a batch: ``features`` ``(N, D)``, class indices ``labels`` ``(N,)``, and for
        the Gram statistics the ``projected`` features ``(N, M)`` and which samples are held
        out (``holdout``, a bool mask)."""
        sums, counts = class_sums(features.detach(), labels, self.num_classes)
        self.sums += sums
        self.counts += counts
        if self.projection_dim is None:
            return
        if projected is None:
            raise ValueError("ClassStatistics with projection_dim needs the projected features")
        self._add_gram(projected, labels, "")
        if holdout is not None and bool(holdout.any()):
            self._add_gram(projected[holdout], labels[holdout], "_val")
            self.count_val += holdout.sum().to(STAT_DTYPE)

    def _add_gram(self, projected: Tensor, labels: Tensor, suffix: str) -> None:
        # In float64: the ridge solution amplifies rounding by the Gram's condition number
        # (float32 batch products left DDP and single-process weights 1e-4 apart).
        h = projected.detach().to(STAT_DTYPE)
        getattr(self, f"gram{suffix}").add_(h.T @ h)
        getattr(self, f"cross{suffix}").add_(class_sums(h, labels, self.num_classes)[0].T)

    def compute(self) -> dict[str, Tensor]:
        # torchmetrics' public view of the states added with add_state (after compute's
        # sync, these are the sums over processes)
        return {k: v for k, v in self.metric_state.items() if isinstance(v, Tensor)}


def float64_zeros(*shape: int) -> Tensor:
    return torch.zeros(shape, dtype=STAT_DTYPE)


# -- ridge regression -----------------------------------------------------------------------
def ridge_solve(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """``W = (G + λI)⁻¹ Q`` in float64: Cholesky (``G + λI`` is symmetric positive definite
    for ``λ > 0``), LU where rounding leaves it indefinite."""
    a = gram.to(STAT_DTYPE, copy=True)
    a.diagonal().add_(ridge)
    b = cross.to(STAT_DTYPE)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    return torch.linalg.solve(a, b)


def heldout_squared_error(
    weights: Tensor, gram_val: Tensor, cross_val: Tensor, count_val
) -> Tensor:
    """``Σ ‖y - Wᵀh‖²`` over held-out samples, from their statistics alone:
    ``Σ‖y‖² - 2 tr(Wᵀ Q_val) + tr(Wᵀ G_val W)``."""
    w = weights.to(STAT_DTYPE)
    return count_val - 2 * (w * cross_val).sum() + (w * (gram_val @ w)).sum()


def select_ridge(
    gram: Tensor,
    cross: Tensor,
    gram_val: Tensor,
    cross_val: Tensor,
    count_val: Tensor | float,
    ridges: Sequence[float],
) -> tuple[float, list[float]]:
    """The ridge of ``ridges`` whose solution on the fitting samples (all minus held-out:
    ``G - G_val``, ``Q - Q_val``) has the least held-out squared error, and every ridge's
    error (as RanPAC's official code selects, by held-out MSE). Without held-out samples,
    or with one ridge: the largest ridge."""
    if len(ridges) == 1 or float(count_val) == 0:
        return float(max(ridges)), []
    gram_fit, cross_fit = gram - gram_val, cross - cross_val
    errors = []
    for r in ridges:
        weights = ridge_solve(gram_fit, cross_fit, r)
        errors.append(float(heldout_squared_error(weights, gram_val, cross_val, count_val)))
    best = min(range(len(ridges)), key=errors.__getitem__)
    return float(ridges[best]), errors


# -- the heads ------------------------------------------------------------------------------
