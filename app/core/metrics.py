"""Continual-learning metrics.

``ExperienceAccuracy`` accumulates accuracy per test experience (DDP-safe via torchmetrics state
sync). The pure functions below reduce an accuracy matrix ``R`` where ``R[k][j]`` is the accuracy
on test experience ``j`` after training experience ``k``. ``R`` has ``K <= T`` rows of ``T``
columns (fewer rows when a run stopped early); ``k = K - 1`` denotes the last row.

For zero-shot models (an aligner classifying by class prompts) the MTIL protocol's figures
(Zheng et al. 2023, ZSCL, as their evaluation code computes them) read the same matrix:
``Transfer`` (accuracy on experiences not trained yet), ``Average`` (the whole matrix) and
``Last`` (the last row, every experience); the untrained model's row (the baseline) is
their zero-shot reference.

References: Lopez-Paz & Ranzato 2017 (GEM: ACC, BWT, FWT); Chaudhry et al. 2018 (RWalk:
forgetting); Rebuffi et al. 2017 (iCaRL: average incremental accuracy); Zheng et al. 2023
(ZSCL: MTIL Transfer, Average, Last).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

Matrix = Sequence[Sequence[float]]


class ExperienceAccuracy(Metric):
    """Accuracy on each test experience; ``compute()`` is NaN for experiences never updated."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_experiences: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_experiences < 1:
            raise ValueError(f"num_experiences must be >= 1, got {num_experiences}")
        self.num_experiences = num_experiences
        zeros = torch.zeros(num_experiences, dtype=torch.float)
        self.add_state("correct", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("total", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, experience: int) -> None:
        """Add ``(preds == target).sum()`` and ``target.numel()`` to slot ``experience``."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        if not 0 <= experience < self.num_experiences:
            raise ValueError(f"experience {experience} out of range [0, {self.num_experiences})")
        self.correct[experience] += (preds == target).sum().to(self.correct.dtype)
        self.total[experience] += target.numel()

    def compute(self) -> Tensor:
        """Return ``correct / total`` per experience, NaN where ``total == 0``."""
        nan = torch.full_like(self.correct, float("nan"))
        return torch.where(self.total > 0, self.correct / self.total.clamp_min(1), nan)


class ExperiencePerplexity(Metric):
    """Token-level perplexity on each test experience: ``exp(Σ NLL / Σ tokens)`` over every
    token scored there (summed across batches and ranks, so a batch's size never weighs in);
    ``compute()`` is NaN for experiences never updated."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    nll: Tensor
    tokens: Tensor

    def __init__(self, num_experiences: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_experiences < 1:
            raise ValueError(f"num_experiences must be >= 1, got {num_experiences}")
        self.num_experiences = num_experiences
        # float64: a sum over millions of tokens, each a few nats
        zeros = torch.zeros(num_experiences, dtype=torch.float64)
        self.add_state("nll", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("tokens", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: Tensor | int, experience: int) -> None:
        """Add a batch's summed token NLL (nats) and its number of scored tokens."""
        if not 0 <= experience < self.num_experiences:
            raise ValueError(f"experience {experience} out of range [0, {self.num_experiences})")
        self.nll[experience] += torch.as_tensor(nll_sum).detach().to(self.nll)
        self.tokens[experience] += torch.as_tensor(tokens).to(self.tokens)

    def compute(self) -> Tensor:
        """``exp(nll / tokens)`` per experience, NaN where no token was scored."""
        nan = torch.full_like(self.nll, float("nan"))
        return torch.where(self.tokens > 0, (self.nll / self.tokens.clamp_min(1)).exp(), nan)


def _validate(R: Matrix, baseline: Sequence[float] | None = None) -> list[list[float]]:
    """Return ``R`` as a list of float rows; raise ``ValueError`` if it is not K x T with K <= T."""
    rows = [[float(x) for x in row] for row in R]
    if not rows or not rows[0]:
        raise ValueError("accuracy matrix is empty")
    T = len(rows[0])
    if any(len(r) != T for r in rows):
        raise ValueError(f"accuracy matrix is ragged: row lengths {[len(r) for r in rows]}")
    if len(rows) > T:
        raise ValueError(f"accuracy matrix has {len(rows)} rows but only {T} columns")
    if baseline is not None and len(baseline) != T:
        raise ValueError(f"baseline has {len(baseline)} entries, expected {T}")
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def average_accuracy(R: Matrix) -> float:
    """ACC = mean_{j<=k} R[k][j] (GEM, Lopez-Paz & Ranzato 2017)."""
    R = _validate(R)
    k = len(R) - 1
    return _mean(R[k][: k + 1])


def forgetting(R: Matrix) -> float | None:
    """F = mean_{j<k} (max_{l in [j, k-1]} R[l][j] - R[k][j]) (RWalk, Chaudhry et al. 2018)."""
    R = _validate(R)
    k = len(R) - 1
    if k == 0:
        return None
    return _mean([max(R[i][j] for i in range(j, k)) - R[k][j] for j in range(k)])


def backward_transfer(R: Matrix) -> float | None:
    """BWT = mean_{j<k} (R[k][j] - R[j][j]) (GEM, Lopez-Paz & Ranzato 2017)."""
    R = _validate(R)
    k = len(R) - 1
    if k == 0:
        return None
    return _mean([R[k][j] - R[j][j] for j in range(k)])


def forward_transfer(R: Matrix, baseline: Sequence[float] | None) -> float | None:
    """FWT = mean_{1<=j<=k} (R[j-1][j] - b[j]), b = accuracies at random init (GEM)."""
    R = _validate(R, baseline)
    k = len(R) - 1
    if k == 0 or baseline is None:
        return None
    return _mean([R[j - 1][j] - float(baseline[j]) for j in range(1, k + 1)])


def average_incremental_accuracy(R: Matrix) -> float:
    """mean_{k<K} ACC_k with ACC_k = mean_{j<=k} R[k][j]: the average accuracy on the
    experiences seen so far, averaged over the K points of the run (iCaRL, Rebuffi et al. 2017;
    the figure class-incremental papers report beside the final ACC)."""
    R = _validate(R)
    return _mean([average_accuracy(R[: k + 1]) for k in range(len(R))])


def mtil_transfer_per_experience(R: Matrix) -> list[float | None]:
    """Column ``j``: mean_{k<min(j, K)} R[k][j], the accuracy on experience ``j`` of the models
    that have not trained on it yet (ZSCL's Transfer of one dataset); ``None`` for ``j = 0``."""
    R = _validate(R)
    T = len(R[0])
    return [None] + [_mean([R[k][j] for k in range(min(j, len(R)))]) for j in range(1, T)]


def mtil_transfer(R: Matrix) -> float | None:
    """Transfer = mean_{1<=j<T} (mean_{k<min(j, K)} R[k][j]): zero-shot accuracy on the
    experiences not trained yet (ZSCL, Zheng et al. 2023); ``None`` with one experience."""
    columns = [t for t in mtil_transfer_per_experience(R) if t is not None]
    return _mean(columns) if columns else None


def mtil_average(R: Matrix) -> float:
    """Average = mean_{k<K} mean_{j<T} R[k][j]: every row, every column (ZSCL's "Avg.")."""
    R = _validate(R)
    return _mean([_mean(row) for row in R])


def mtil_last(R: Matrix) -> float:
    """Last = mean_{j<T} R[K-1][j]: the last model on every experience, trained or not (ZSCL)."""
    R = _validate(R)
    return _mean(R[-1])


def summarize(
    R: Matrix, baseline: Sequence[float] | None = None, zero_shot: bool = False
) -> dict[str, Any]:
    """All metrics of ``R`` as a JSON-serializable dict of plain Python values.

    With ``zero_shot`` (a model that classifies experiences it never trained on) the MTIL
    figures are added: ``mtil_transfer``, ``mtil_average``, ``mtil_last``, their per-experience
    columns, and ``zero_shot_transfer``, the Transfer the untrained model (``baseline``, the
    zero-shot row) has on the same columns: mean_{1<=j<T} b[j].
    """
    R = _validate(R, baseline)
    summary = {
        "accuracy_matrix": R,
        "average_accuracy": average_accuracy(R),
        "average_accuracy_per_experience": [average_accuracy(R[: i + 1]) for i in range(len(R))],
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, baseline),
        "baseline": None if baseline is None else [float(b) for b in baseline],
    }
    if zero_shot:
        unseen = [float(b) for b in baseline[1:]] if baseline is not None else []
        summary.update(
            mtil_transfer=mtil_transfer(R),
            mtil_average=mtil_average(R),
            mtil_last=mtil_last(R),
            mtil_transfer_per_experience=mtil_transfer_per_experience(R),
            mtil_average_per_experience=[_mean(column) for column in zip(*R, strict=True)],
            zero_shot_transfer=_mean(unseen) if unseen else None,
        )
    return summary


# -- lower-is-better matrices (perplexity) ------------------------------------------------
def perplexity_forgetting(P: Matrix) -> float | None:
    """F = mean_{j<k} (P[k][j] - min_{l in [j, k-1]} P[l][j]): the mean rise of each earlier
    experience's perplexity above its best (RWalk's forgetting with max -> min and the
    difference turned, so that positive means forgotten, as for accuracy)."""
    P = _validate(P)
    k = len(P) - 1
    if k == 0:
        return None
    return _mean([P[k][j] - min(P[i][j] for i in range(j, k)) for j in range(k)])


def perplexity_bwt(P: Matrix) -> float | None:
    """BWT = mean_{j<k} (P[j][j] - P[k][j]): GEM's backward transfer with the difference
    turned, so that positive means later training helped earlier experiences (as for
    accuracy) and negative means their perplexity rose."""
    P = _validate(P)
    k = len(P) - 1
    if k == 0:
        return None
    return _mean([P[j][j] - P[k][j] for j in range(k)])


def summarize_perplexity(P: Matrix) -> dict[str, Any]:
    """The figures of a perplexity matrix ``P[k][j]`` (after experience ``k``, on test
    experience ``j``; lower is better), JSON-serializable:

    - ``average_perplexity`` = mean_{j<=k} P[k][j] (the last row, on what was trained);
    - ``perplexity_forgetting`` (:func:`perplexity_forgetting`), ``perplexity_bwt``
      (:func:`perplexity_bwt`);
    - ``general_perplexity_rise`` = P[k][0] / P[0][0] - 1: how much the perplexity of test
      experience 0 (a language-model stream's general stage, the base model's own kind of
      text) rose after training on everything else (None with one row).
    """
    P = _validate(P)
    k = len(P) - 1
    return {
        "perplexity_matrix": P,
        "average_perplexity": _mean(P[k][: k + 1]),
        "average_perplexity_per_experience": [_mean(P[i][: i + 1]) for i in range(len(P))],
        "perplexity_forgetting": perplexity_forgetting(P),
        "perplexity_bwt": perplexity_bwt(P),
        "general_perplexity_rise": P[k][0] / P[0][0] - 1 if k > 0 else None,
    }
