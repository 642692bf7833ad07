"""Class statistics, and the prototype and analytic heads built on them: nearest class mean
(NCM), SimpleCIL and RanPAC.

One implementation of per-class statistics serves every prototype classifier of Mneme, the
continual heads here and the prototypes of a few-shot episode:

- :func:`class_sums` / :func:`class_means`: per-class feature sums, counts and means of a
  set of features (a support set: ``means, counts = class_means(features, labels, n_way)``),
  and :func:`prototype_logits`, the cosine or negative squared Euclidean score of each
  feature against each prototype (a prototypical network's logits with ``euclidean``);
- :class:`ClassStatistics`: the same sums, counts and, for RanPAC, Gram matrices, accumulated
  batch by batch as a torchmetrics ``Metric`` whose states are summed across processes;
- :class:`PrototypeHead` and its kinds (:data:`HEADS`): the statistics of every experience so
  far as persistent buffers, and the logits they give.

A head accumulates an experience once, after the experience's training
(:meth:`PrototypeHead.fit_experience`): each process reads its own shard of the experience's
training samples into a fresh :class:`ClassStatistics`, its states are summed across
processes (one all-reduce each), and the global sums are added to the head's buffers. The
buffers are therefore the same on every process, and a checkpoint (which holds rank 0's
state dict) holds the statistics of the whole stream so far: a resumed run continues from
them. ``fitted_experiences`` (a buffer) counts the experiences absorbed, so one is never added
twice. The statistics are sums, so accumulating two experiences one after the other gives the
statistics of their union.

Heads, named in YAML by ``model.init_args.head``::

    head: {name: linear}                       # the default: a trained linear layer
    head: {name: ncm, metric: cosine}          # or euclidean; normalize: true for unit features
    head: {name: simplecil}                    # Zhou et al. 2023: cosine to raw class means
    head: {name: ranpac, projection_dim: 5000, ridges: [1.0e-2, 1.0, 1.0e2, 1.0e4], holdout: 0.2}

References: Mensink et al. 2013 (NCM); Snell et al. 2017 (prototypical networks); Zhou et
al. 2023, "Revisiting class-incremental learning with pre-trained models" (SimpleCIL, APER);
McDonald et al. 2023, "RanPAC: Random projections and pre-trained models for continual
learning".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from mneme.app.core.errors import ConfigError
from mneme.app.core.seeding import keyed_generator, run_seed
from mneme.app.nn.heads.class_statistics import (
    STAT_DTYPE,
    ClassStatistics,
    class_sums,
    float64_zeros,
    ridge_solve,
    select_ridge,
)
from torch import Tensor, nn

METRICS = ("cosine", "euclidean")
FIELD = "model.head"
LINEAR = "linear"
# RanPAC's official code searches 10**-8 .. 10**13; these span the useful part for a few
# thousand projected features (the choice is reported as ``ridge``).
DEFAULT_RIDGES = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6)


# -- the statistics -------------------------------------------------------------------------
def means_of(sums: Tensor, counts: Tensor) -> Tensor:
    """Class means from sums and counts (zero for a class without samples)."""
    return sums / counts.clamp_min(1).unsqueeze(1)


def class_means(
    features: Tensor, labels: Tensor, num_classes: int, normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """Prototypes of a set of features: the mean feature of each class ``(C, D)`` (in the
    features' dtype; zero for an absent class) and the class counts ``(C,)``. With
    ``normalize`` each feature is scaled to unit length first.

    Example (a few-shot episode)::

        prototypes, _ = class_means(encoder(support_x), support_y, n_way)
        logits = prototype_logits(encoder(query_x), prototypes, "euclidean")
    """
    if normalize:
        features = F.normalize(features, dim=1)
    sums, counts = class_sums(features, labels, num_classes)
    return means_of(sums, counts).to(features.dtype), counts


def prototype_logits(features: Tensor, prototypes: Tensor, metric: str = "euclidean") -> Tensor:
    """Scores ``(N, C)`` of features ``(N, D)`` against prototypes ``(C, D)``: the cosine
    similarity, or the negative squared Euclidean distance (a prototypical network's)."""
    prototypes = prototypes.to(features.dtype)
    if metric == "cosine":
        return F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T
    if metric == "euclidean":
        squared = (
            features.pow(2).sum(1, keepdim=True)
            - 2 * features @ prototypes.T
            + prototypes.pow(2).sum(1).unsqueeze(0)
        )
        return -squared.clamp_min(0)
    raise ConfigError(f"{FIELD}.metric: one of {METRICS}, got {metric!r}")


def _refresh_after_load(module: PrototypeHead, incompatible_keys: Any) -> None:
    module.refresh()


Encode = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]


class PrototypeHead(nn.Module):
    """Base of the heads that predict from class statistics, trained by no gradient.

    Buffers (persistent, so in the checkpoint): ``sums`` ``(C, D)`` and ``counts`` ``(C,)``
    of every experience absorbed so far, and ``fitted_experiences``, how many there are.
    ``C`` is the number of label slots (``num_heads * num_classes`` for a multi-head
    classifier: slot ``task * num_classes + label``).

    Subclasses add their own statistics (:meth:`statistics`, :meth:`update`) and logits
    (:meth:`forward`). ``ready`` says whether any statistic was absorbed; ``seen`` marks the
    slots with samples (the only ones with a prototype).
    """

    projection_dim: int | None = None

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.register_buffer("sums", float64_zeros(num_classes, feature_dim))
        self.register_buffer("counts", float64_zeros(num_classes))
        self.register_buffer("fitted_experiences", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool), persistent=False)
        self.ready = False
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _apply(self, fn, recurse: bool = True):
        """Moves keep the float64 statistics float64: a cast (``.half()``, a "true"
        precision plugin's ``.to(dtype)``) would round sums of thousands of terms."""
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == STAT_DTYPE}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != STAT_DTYPE:
                self._buffers[name] = old.to(new.device)
        return self

    # -- accumulating ---------------------------------------------------------------------
    def statistics(self) -> ClassStatistics:
        """A fresh accumulator for one pass, on this head's device."""
        stats = ClassStatistics(self.num_classes, self.feature_dim, self.projection_dim)
        return stats.to(self.sums.device)

    def update(
        self, stats: ClassStatistics, features: Tensor, slots: Tensor, holdout: Tensor | None
    ) -> None:
        """Add a batch of features to ``stats`` (override to transform or project them)."""
        stats.update(features, slots)

    def holdout_mask(self, num_samples: int, experience: int) -> Tensor | None:
        """Which samples of an experience are held out (``None``: none)."""
        return None

    @torch.no_grad()
    def absorb(self, totals: dict[str, Tensor]) -> None:
        """Add an experience's (globally summed) statistics to the buffers."""
        for name, value in totals.items():
            getattr(self, name).add_(value.to(getattr(self, name).device))
        self.solve()
        self.refresh()

    def solve(self) -> None:
        """Derive what the logits need from the statistics (after :meth:`absorb`)."""

    def refresh(self) -> None:
        """Python-side and non-persistent state from the buffers (also after a state-dict
        load)."""
        with torch.no_grad():
            self.seen.copy_(self.counts > 0)
        self.ready = bool(self.seen.any())

    def fit_experience(
        self,
        data: Any,
        encode: Encode,
        experience: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> bool:
        """Accumulate one experience (``data``: an :class:`mneme.datamodules.data.experiences.
        ExperienceData`, or anything with ``len`` and ``batches(batch_size, index)``):
        this process reads samples ``rank::world_size``, ``encode(batch)`` gives their
        features and label slots (the caller's eval mode and device), the statistics are
        summed across processes and absorbed. Call it on every process. An experience
        already absorbed (``experience < fitted_experiences``, e.g. restored from a
        checkpoint) is skipped; returns whether it was absorbed now."""
        if experience < int(self.fitted_experiences):
            return False
        n = len(data)
        shard = torch.arange(n)[rank::world_size]
        holdout = self.holdout_mask(n, experience)
        stats = self.statistics()
        # Validation runs under inference mode: the buffers must stay ordinary tensors.
        with torch.inference_mode(False), torch.no_grad():
            start = 0
            for batch in data.batches(batch_size, shard):
                features, slots = encode(batch)
                held = None
                if holdout is not None:
                    held = holdout[shard[start : start + len(slots)]].to(features.device)
                start += len(slots)
                self.update(stats, features, slots, held)
            totals = stats.compute()  # summed over processes
            self.absorb({k: v.clone() for k, v in totals.items()})
            self.fitted_experiences.fill_(experience + 1)
        return True

    def forward(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feature_dim={self.feature_dim}"


class NCMHead(PrototypeHead):
    """Nearest class mean: each class's prototype is the mean of its features (of unit
    features with ``normalize``); logits are the ``cosine`` similarity to each prototype or
    the negative squared ``euclidean`` distance.

    Args:
        metric: ``cosine`` or ``euclidean``.
        normalize: scale each feature to unit length before averaging and scoring.
    """

    spec_keys: ClassVar[tuple[str, ...]] = ("metric", "normalize")  # its config keys

    def __init__(
        self, num_classes: int, feature_dim: int, metric: str = "cosine", normalize: bool = False
    ) -> None:
        if metric not in METRICS:
            raise ConfigError(f"{FIELD}.metric: one of {METRICS}, got {metric!r}")
        super().__init__(num_classes, feature_dim)
        self.metric = metric
        self.normalize = bool(normalize)
        self.register_buffer("prototypes", torch.zeros(num_classes, feature_dim), persistent=False)

    def _prepare(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=1) if self.normalize else features

    def update(self, stats, features, slots, holdout) -> None:
        stats.update(self._prepare(features), slots)

    def refresh(self) -> None:
        super().refresh()
        with torch.no_grad():
            self.prototypes.copy_(means_of(self.sums, self.counts))

    def forward(self, features: Tensor) -> Tensor:
        return prototype_logits(self._prepare(features), self.prototypes, self.metric)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, metric={self.metric}, normalize={self.normalize}"


class SimpleCILHead(NCMHead):
    """SimpleCIL (Zhou et al. 2023): a cosine classifier whose weights are the class-mean
    prototypes of the frozen (or, APER, first-experience-adapted) backbone: the same
    prediction as ``{name: ncm, metric: cosine}``, named for the paper's recipe."""

    spec_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__(num_classes, feature_dim, metric="cosine", normalize=False)


class RanPACHead(PrototypeHead):
    """RanPAC (McDonald et al. 2023): a fixed random projection ``P`` ``(D, M)`` with
    Gaussian entries, ``h = ReLU(f P)``, and the ridge regression of one-hot labels on
    ``h`` over every sample so far, solved from the accumulated ``G = Σ h hᵀ`` and
    ``Q = Σ h yᵀ``: ``W = (G + λI)⁻¹ Q``; logits ``h W``.

    ``λ`` is chosen from ``ridges`` after each experience: a seeded ``holdout`` fraction of
    each experience's training samples is held out (their ``G_val``, ``Q_val`` accumulated
    too), each ``λ`` is solved on the rest and scored by the held-out squared error, and
    the best is solved again on all samples. The choice is the buffer ``ridge``.

    ``P`` is drawn from a generator seeded by ``seed`` (default: the run's), without
    touching the global RNG, and kept as a buffer, so a resumed run projects as the
    interrupted one did whatever its torch version draws.

    Args:
        projection_dim: ``M``.
        ridges: candidate ``λ`` values (one: used as it is, nothing is held out).
        holdout: fraction of each experience held out for choosing ``λ``.
        seed: seed of ``P`` and of the held-out samples.

    Size: ``G`` and ``G_val`` are ``M x M`` float64 each (400 MB together at ``M = 5000``),
    in memory and in every checkpoint.
    """

    spec_keys: ClassVar[tuple[str, ...]] = ("projection_dim", "ridges", "holdout", "seed")

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        projection_dim: int = 5000,
        ridges: Sequence[float] = DEFAULT_RIDGES,
        holdout: float = 0.2,
        seed: int | None = None,
    ) -> None:
        if projection_dim < 1:
            raise ConfigError(f"{FIELD}.projection_dim: must be at least 1, got {projection_dim}")
        ridges = [float(r) for r in ridges]
        if not ridges or min(ridges) <= 0:
            raise ConfigError(f"{FIELD}.ridges: one or more positive values, got {ridges}")
        if not 0 <= holdout < 1:
            raise ConfigError(f"{FIELD}.holdout: a fraction in [0, 1), got {holdout}")
        if holdout == 0 and len(ridges) > 1:
            raise ConfigError(
                f"{FIELD}.holdout: choosing among {len(ridges)} ridges needs held-out samples; "
                "set holdout (e.g. 0.2) or give one ridge"
            )
        super().__init__(num_classes, feature_dim)
        self.projection_dim = projection_dim
        self.ridges = ridges
        self.holdout = float(holdout) if len(ridges) > 1 else 0.0
        seed = run_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer(
            "projection", torch.randn(feature_dim, projection_dim, generator=generator)
        )
        m = projection_dim
        for suffix in ("", "_val"):
            self.register_buffer(f"gram{suffix}", float64_zeros(m, m))
            self.register_buffer(f"cross{suffix}", float64_zeros(m, num_classes))
        self.register_buffer("count_val", float64_zeros())
        self.register_buffer("weights", torch.zeros(m, num_classes))
        self.register_buffer("ridge", float64_zeros())
        self.ridge_errors: list[float] = []  # held-out squared error of each ridge, last solve

    def project(self, features: Tensor) -> Tensor:
        return F.relu(features @ self.projection.to(features.dtype))

    def update(self, stats, features, slots, holdout) -> None:
        stats.update(features, slots, projected=self.project(features), holdout=holdout)

    def holdout_mask(self, num_samples: int, experience: int) -> Tensor | None:
        if self.holdout == 0:
            return None
        generator = keyed_generator(int(self.seed), experience)
        order = torch.randperm(num_samples, generator=generator)
        mask = torch.zeros(num_samples, dtype=torch.bool)
        mask[order[: round(self.holdout * num_samples)]] = True
        return mask

    def solve(self) -> None:
        ridge, self.ridge_errors = select_ridge(
            self.gram, self.cross, self.gram_val, self.cross_val, self.count_val, self.ridges
        )
        self.ridge.fill_(ridge)
        self.weights.copy_(ridge_solve(self.gram, self.cross, ridge))

    def forward(self, features: Tensor) -> Tensor:
        return self.project(features) @ self.weights.to(features.dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, projection_dim={self.projection_dim}, "
            f"ridges={self.ridges}, holdout={self.holdout}"
        )


def head_name(spec: dict[str, Any] | None) -> str:
    """The head a ``model.head`` spec names (``linear`` when none)."""
    return str((spec or {}).get("name", LINEAR))
