"""What a head may need from the model that hosts it, as one small protocol.

Most heads are plain layers: the model trains them with the rest of its parameters and
nothing else. A head that needs hooks of the training run (the mixture-of-experts head,
:mod:`mneme.app.nn.heads.moe`: a loss term, experts grown per experience, gradients
averaged outside DDP, routing logged, generations rebuilt before a checkpoint loads, a
parameter group per generation) implements :class:`HeadLifecycle`. :func:`lifecycle` gives
the host that head, or :data:`NO_HOOKS` for any other, so that the host calls every hook
unconditionally instead of asking what its head is.

Plain torch: the hooks take what they need (an experience index, optimizers, loggers), not a
trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class HeadLifecycle(Protocol):
    """The hooks a head implements when it needs more from its host than its forward."""

    def add_loss_terms(self, module: Any) -> None:
        """Register the head's loss terms on ``module`` (a ContinualModule), once; at setup."""
        ...

    def start_experience(
        self, experience: int, optimizers: Sequence[Any], first_epoch: bool
    ) -> None:
        """At each training epoch's start, before its first step."""
        ...

    def average_outside_ddp(self) -> None:
        """Before each optimizer step, on every rank: gradients DDP does not average."""
        ...

    def log_routing(self, loggers: Sequence[Any], experience: int) -> None:
        """At an experience's last training epoch's end."""
        ...

    def restore(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Before a checkpoint's ``state_dict`` (the head's keys under ``prefix``) loads."""
        ...

    def step_outputs(self) -> dict[str, Tensor]:
        """What each training step's outputs carry from the head's last forward."""
        ...

    def param_groups(self) -> list[dict[str, Any]]:
        """The head's own optimizer parameter groups; none: it trains with the rest."""
        ...


class NoHeadHooks:
    """The hooks of a head that needs none (a ``Linear``): each does nothing."""

    def add_loss_terms(self, module: Any) -> None:
        pass

    def start_experience(
        self, experience: int, optimizers: Sequence[Any], first_epoch: bool
    ) -> None:
        pass

    def average_outside_ddp(self) -> None:
        pass

    def log_routing(self, loggers: Sequence[Any], experience: int) -> None:
        pass

    def restore(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        pass

    def step_outputs(self) -> dict[str, Tensor]:
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        return []


NO_HOOKS = NoHeadHooks()


def lifecycle(head: Any) -> HeadLifecycle:
    """``head`` when it implements :class:`HeadLifecycle`, else the shared no-op hooks (also
    for ``None``: a model whose head is not built yet)."""
    return head if isinstance(head, HeadLifecycle) else NO_HOOKS
