"""The experience schedule, in one place: which experience an epoch trains, where an
experience starts and ends, and the trainer settings that make it hold.

One ``fit`` trains the whole stream: experience ``k`` covers epochs
``[k * E, (k + 1) * E)`` with ``E = epochs_per_experience``. Everything here is a pure
function of Lightning's public epoch counter (``trainer.current_epoch``), so the
datamodule, the modules, the strategies and the metrics agree, and a resumed run needs no
bookkeeping of its own.
"""

from __future__ import annotations

from typing import Any, Protocol

from mneme.datamodules.errors import ConfigError

LIGHTNING_SANITY_STEPS = 2  # Trainer(num_sanity_val_steps=...)'s default


class Stream(Protocol):
    """What the schedule needs from a datamodule."""

    epochs_per_experience: int

    @property
    def num_experiences(self) -> int: ...


def experience_of_epoch(epoch: int, stream: Stream) -> int:
    """The experience that ``epoch`` trains on."""
    k = epoch // stream.epochs_per_experience
    if not 0 <= k < stream.num_experiences:
        raise ConfigError(
            f"trainer.max_epochs: epoch {epoch} lies past the stream's {stream.num_experiences} "
            f"experiences x {stream.epochs_per_experience} epochs; leave max_epochs unset"
        )
    return k


def current_experience(trainer: Any) -> int:
    """The experience of the running epoch (valid in epoch and batch hooks)."""
    return experience_of_epoch(trainer.current_epoch, trainer.datamodule)


def is_experience_start(trainer: Any) -> bool:
    """Whether the running epoch is the first of its experience."""
    return trainer.current_epoch % trainer.datamodule.epochs_per_experience == 0


def is_experience_end(trainer: Any) -> bool:
    """Whether the running epoch is the last of its experience."""
    return (trainer.current_epoch + 1) % trainer.datamodule.epochs_per_experience == 0


def stream_epochs(stream: Stream) -> int:
    return stream.num_experiences * stream.epochs_per_experience


def trainer_settings(
    stream: Stream, validate_each_epoch: bool = False, user: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The trainer arguments the schedule needs, given what the user set (``user``: the
    trainer's arguments, Lightning's defaults where not set). A user setting that
    conflicts is refused in one line, never overwritten.

    - ``max_epochs``: the stream's epochs when unset; fewer trains a prefix of the stream.
    - ``reload_dataloaders_every_n_epochs=1``: the train loader serves one experience and is
      built anew each epoch (cheap: batches are index slices).
    - ``check_val_every_n_epoch``: each experience end (``E``), every epoch with
      ``validate_each_epoch``; any divisor of ``E`` the user sets is kept.
    - ``num_sanity_val_steps=-1`` unless set: the full validation pass before training
      gives ``ContinualMetrics`` the untrained baseline row (0 skips it: no FWT).

    Example::

        trainer = Trainer(**trainer_settings(datamodule), logger=False)
    """
    user = dict(user or {})
    total = stream_epochs(stream)
    epochs = stream.epochs_per_experience
    max_epochs = user.get("max_epochs")
    if max_epochs is None:
        max_epochs = total
    elif not 1 <= max_epochs <= total:
        raise ConfigError(
            f"trainer.max_epochs: {max_epochs} does not fit the stream's {total} epochs "
            f"({stream.num_experiences} experiences x {epochs}); leave it unset to train the "
            f"whole stream, or set 1..{total} to train a prefix"
        )
    reload = user.get("reload_dataloaders_every_n_epochs", 0)
    if reload not in (0, 1):
        raise ConfigError(
            f"trainer.reload_dataloaders_every_n_epochs: {reload} breaks the experience "
            "schedule (the train loader serves one experience and is rebuilt each epoch); "
            "leave it unset"
        )
    check_val = user.get("check_val_every_n_epoch", 1)
    if check_val == 1:  # Lightning's default: Mneme validates at experience ends
        check_val = 1 if validate_each_epoch else epochs
    elif check_val is None or epochs % check_val:
        raise ConfigError(
            f"trainer.check_val_every_n_epoch: {check_val} skips experience ends (every "
            f"{epochs} epochs), where the accuracy matrix is filled; use a divisor of "
            f"{epochs}, or data.validate_each_epoch: true"
        )
    sanity = user.get("num_sanity_val_steps", LIGHTNING_SANITY_STEPS)
    return {
        "max_epochs": max_epochs,
        "reload_dataloaders_every_n_epochs": 1,
        "check_val_every_n_epoch": check_val,
        # Lightning's validation pass before training, over every batch: the untrained
        # model's accuracy row (the baseline of forward transfer) comes from it.
        "num_sanity_val_steps": -1 if sanity in (None, LIGHTNING_SANITY_STEPS) else sanity,
    }


def check_trainer(trainer: Any, stream: Stream, validate_each_epoch: bool = False) -> None:
    """Refuse, in one line, a trainer whose settings break the schedule (one built in
    Python without :func:`trainer_settings`; the ``mneme`` CLI uses it)."""
    actual = {
        "max_epochs": trainer.max_epochs,
        "reload_dataloaders_every_n_epochs": trainer.reload_dataloaders_every_n_epochs,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
    }
    hint = "; build it with Trainer(**datamodule.trainer_settings(), ...)"
    try:
        trainer_settings(stream, validate_each_epoch, actual)
    except ConfigError as error:
        raise ConfigError(f"{error}{hint}") from None
    if actual["reload_dataloaders_every_n_epochs"] != 1:
        raise ConfigError(
            "trainer.reload_dataloaders_every_n_epochs: must be 1 (the train loader serves "
            f"the running experience){hint}"
        )
