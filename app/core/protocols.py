"""What callbacks may need from a module, declared: small ``typing.Protocol`` classes.

A callback names the protocol it needs and checks it with :func:`require` in ``setup`` or
``on_fit_start``, before any training, so misuse ends in one line naming the callback, the
module's class and what it lacks, not in an ``AttributeError`` an experience later. This
module imports nothing heavy: callbacks import it and nothing else from ``mneme.app``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mneme.app.core.errors import ConfigError

Batch = dict[str, Any]
# A named extra loss a callback registers: (batch, outputs) -> scalar. ``outputs`` holds what
# the module's forward pass produced (``logits``, ``features`` or ``embeddings``).
LossTerm = Callable[[Batch, dict[str, Any]], Any]
# A training-batch transform: (batch, batch_idx) -> batch, on the device, before forward.
BatchTransform = Callable[[Batch, int], Batch]
# The batch key of soft targets (rows summing to 1 over the classes) that a module trains on
# instead of ``label`` when present: MixUp/CutMix and label smoothing write it.
SOFT_LABEL = "soft_label"


class StrategyHost(Protocol):
    """A module that runs the strategies' extension points around every training step
    (:class:`mneme.app.models.base.ContinualModule`)."""

    def add_loss_term(self, name: str, term: LossTerm) -> None: ...

    def remove_loss_term(self, name: str) -> None: ...

    def add_batch_transform(self, name: str, transform: BatchTransform) -> None: ...

    def remove_batch_transform(self, name: str) -> None: ...


class Classifier(StrategyHost, Protocol):
    """Logits from an encoder and a linear head (one, or one slice per task)
    (:class:`mneme.app.ContinualClassifier`)."""

    encoder: Any
    head: Any
    num_heads: int
    num_classes: int
    input_key: str

    def forward(self, x: Any, task: Any = None) -> Any: ...


class FeatureClassifier(Classifier, Protocol):
    """A classifier with separate features and logits (``ContinualClassifier``).

    ``features(x, task)``, then ``head(features)`` (raw, every head) or
    ``linear_logits(features, task)`` (each sample's task slice, what cross-entropy trains).
    """

    def features(self, x: Any, task: Any = None) -> Any: ...

    def linear_logits(self, features: Any, task: Any = None) -> Any: ...


class ZeroShotClassifier(StrategyHost, Protocol):
    """Class logits of ``input_key`` inputs through ``forward`` (a classifier, or an aligner's
    zero-shot head): what a cross-entropy Fisher needs."""

    input_key: str

    def forward(self, x: Any, task: Any = None) -> Any: ...


class SoftTargetClassifier(StrategyHost, Protocol):
    """A classifier over ``num_classes`` classes that trains on ``batch["soft_label"]`` when
    the batch carries it (:class:`mneme.app.ContinualClassifier`): what MixUp needs."""

    num_classes: int


class Embedder(StrategyHost, Protocol):
    """Per-modality encoders into one space, with class-prompt embeddings
    (:class:`mneme.app.ContrastiveAligner`)."""

    encoders: Any
    text_key: str

    def embed(self, batch: Batch, modalities: Any = None) -> dict[str, Any]: ...

    def class_embeddings(self, text_encoder: Any = None) -> Any: ...


class Prunable(Protocol):
    """A module whose layers :class:`mneme.callbacks.Pruning` finds by name (any
    ``nn.Module``)."""

    def named_modules(self, *args: Any, **kwargs: Any) -> Any: ...


class ReportsExperienceAccuracy(Protocol):
    """A module whose ``validation_step``/``test_step`` update ``experience_accuracy`` (an
    :class:`mneme.app.core.metrics.ExperienceAccuracy`) per test experience."""

    experience_accuracy: Any


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The attributes and methods of ``protocol`` that ``obj`` lacks (``None`` counts as
    missing: a module that has not built the part yet)."""
    names = set()
    for cls in protocol.__mro__:
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        names |= set(cls.__dict__.get("__annotations__", {}))
        names |= {n for n, v in cls.__dict__.items() if callable(v) and not n.startswith("_")}
    return sorted(n for n in names if getattr(obj, n, None) is None)


def require(obj: Any, protocol: type, who: str) -> None:
    """Refuse ``obj`` in one line if it lacks a member of ``protocol``."""
    missing = missing_members(obj, protocol)
    if missing:
        raise ConfigError(
            f"trainer.callbacks: {who} needs a {protocol.__name__} module "
            f"({(protocol.__doc__ or '').strip().splitlines()[0].rstrip('.')}); "
            f"{type(obj).__name__} lacks {', '.join(missing)}"
        )
