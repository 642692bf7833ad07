"""Checks of settings Lightning or numpy would otherwise refuse with a traceback, and of a
checkpoint whose weights are not finite (:mod:`mneme.app.core.finite_weights`): each a
one-line ``ConfigError`` naming the field."""

from __future__ import annotations

from mneme.app.core.errors import ConfigError
from mneme.app.core.finite_weights import check_finite_weights  # noqa: F401 - the CLI's

# numpy's seeds (Lightning's seed_everything seeds numpy too)
SEED_RANGE = (0, 2**32 - 1)


def check_seed(seed) -> None:
    """Refuse a ``seed_everything`` numpy cannot take (Lightning raises deep inside)."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ConfigError(
                f"seed_everything: must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} "
                f"(numpy's seeds), got {seed}"
            )


def check_state_keys(callbacks) -> None:
    """Refuse two stateful callbacks with one ``state_key`` (two Replays with the same
    arguments): a checkpoint could not tell their states apart (Lightning refuses it with
    a traceback when the trainer is built)."""
    from collections import Counter

    from lightning.pytorch import Callback

    stateful = [c for c in callbacks if type(c).state_dict is not Callback.state_dict]
    counts = Counter(c.state_key for c in stateful)
    for callback in stateful:
        if counts[callback.state_key] > 1:
            name = type(callback).__name__
            raise ConfigError(
                f"trainer.callbacks: {counts[callback.state_key]} {name} callbacks with the same "
                f"arguments ({callback.state_key}); a checkpoint could not tell their states "
                f"apart: keep one, or give each {name} different arguments"
            )
