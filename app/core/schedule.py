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

from mneme.app.core.errors import ConfigError

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


# Trainer arguments that stop, cut or re-time an epoch, so that the stream's experiences or
# its accuracy rows would no longer fall at epoch ends: each holds only at its Lightning
# default (or one of the values listed), and any other value is refused. Value: (accepted
# values, why another breaks the schedule, what to do instead).
FIXED_SETTINGS: dict[str, tuple[tuple[Any, ...], str, str]] = {
    "fast_dev_run": ((False, 0), "runs a few batches, not the stream", "leave it unset"),
    "overfit_batches": (
        (0, 0.0),
        "validates on training batches, so the accuracy matrix is not one",
        "leave it unset",
    ),
    "max_steps": (
        (-1, None),
        "stops at a step count, inside an experience",
        "leave it unset; train a prefix with max_epochs",
    ),
    "min_steps": ((None,), "can train past the stream's last epoch", "leave it unset"),
    "max_time": (
        (None,),
        "stops at a time, inside an experience",
        "leave it unset (a SIGTERM from a scheduler ends the run resumably)",
    ),
    "limit_train_batches": (
        (None, 1.0, "__positive__"),
        "trains no batch",
        "leave it unset, or a positive number or fraction",
    ),
    "limit_val_batches": (
        (None, 1.0, "__positive__"),
        "validates nothing, so no accuracy row is measured",
        "leave it unset",
    ),
    "val_check_interval": (
        (None, 1.0),
        "validates inside an epoch, so accuracy rows are taken mid-experience",
        "leave it unset; data.validate_each_epoch validates at every epoch end",
    ),
    "accumulate_grad_batches": (
        ("__positive_int__",),
        "must be a whole number of batches, at least 1",
        "leave it unset (1)",
    ),
}


def _accepted(value: Any, accepted: tuple[Any, ...]) -> bool:
    if "__positive__" in accepted and isinstance(value, (int, float)) and value > 0:
        return not isinstance(value, bool)
    if "__positive_int__" in accepted:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return any(value == a and type(value) is not bool or value is a for a in accepted)


def check_fixed_settings(user: dict[str, Any]) -> None:
    """Refuse, in one line, a trainer argument of :data:`FIXED_SETTINGS` the schedule cannot
    follow (``user``: the arguments set; those absent keep Lightning's defaults)."""
    for key, (accepted, why, fix) in FIXED_SETTINGS.items():
        if key in user and not _accepted(user[key], accepted):
            raise ConfigError(f"trainer.{key}: {user[key]!r} {why}; {fix}")


def trainer_settings(
    stream: Stream, validate_each_epoch: bool = False, user: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The trainer arguments the schedule needs, given what the user set (``user``: the
    trainer's arguments, Lightning's defaults where not set). A user setting that
    conflicts is refused in one line, never overwritten.

    - ``max_epochs``: the stream's epochs when unset; a multiple of ``E`` below it trains a
      prefix of the stream (reported incomplete), any other value stops inside an
      experience and is refused.
    - ``reload_dataloaders_every_n_epochs=1``: the train loader serves one experience and is
      built anew each epoch (cheap: batches are index slices).
    - ``check_val_every_n_epoch``: each experience end (``E``), every epoch with
      ``validate_each_epoch``; any divisor of ``E`` the user sets is kept.
    - ``num_sanity_val_steps=-1`` unless set: the full validation pass before training
      gives ``ContinualMetrics`` the untrained baseline row (0 skips it: no FWT).
    - the arguments of :data:`FIXED_SETTINGS` (``max_steps``, ``val_check_interval``,
      ``limit_train_batches``, ...) only at values that keep epochs whole.

    Example::

        trainer = Trainer(**trainer_settings(datamodule), logger=False)
    """
    user = dict(user or {})
    check_fixed_settings(user)
    total = stream_epochs(stream)
    epochs = stream.epochs_per_experience
    max_epochs = user.get("max_epochs")
    if max_epochs is None:
        max_epochs = total
    elif not 1 <= max_epochs <= total or max_epochs % epochs:
        raise ConfigError(
            f"trainer.max_epochs: {max_epochs} does not end at an experience end of the "
            f"stream's {total} epochs ({stream.num_experiences} experiences x {epochs}); leave "
            f"it unset to train the whole stream, or set a multiple of {epochs} up to {total} "
            "to train a prefix"
        )
    min_epochs = user.get("min_epochs")
    if min_epochs is not None and not 0 <= min_epochs <= max_epochs:
        raise ConfigError(
            f"trainer.min_epochs: {min_epochs} lies past max_epochs ({max_epochs}); leave it unset"
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
    names = ("max_epochs", "min_epochs", "max_steps", "fast_dev_run", "overfit_batches",
             "limit_train_batches", "limit_val_batches", "val_check_interval",
             "accumulate_grad_batches", "reload_dataloaders_every_n_epochs",
             "check_val_every_n_epoch")  # fmt: skip
    actual = {name: getattr(trainer, name) for name in names}
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
