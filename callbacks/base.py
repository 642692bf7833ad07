"""Experience-level hooks on top of Lightning's epoch hooks, and the one declaration of
whether a callback changes training."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer
from mneme.app.core.schedule import current_experience, is_experience_end, is_experience_start


class ChangesTraining:
    """Mixin of every callback that changes the trained model (a continual strategy,
    augmentation, unfreezing, distillation, adversarial training, pruning, quantization):
    ``affects_training`` is the one declaration that both the resume guard
    (:mod:`mneme.app.models.run_definition`: a resume that drops or adds such a callback is
    refused) and the logged run configuration (``ContinualMetrics``' ``Callbacks``) read.
    A subclass that only observes (a dashboard) sets it to False."""

    affects_training: ClassVar[bool] = True


def affects_training(callback: object) -> bool:
    """Whether ``callback`` declares that it changes training (see :class:`ChangesTraining`);
    a callback that declares nothing (Lightning's checkpoints, progress bars) does not."""
    return bool(getattr(callback, "affects_training", False))


class ExperienceCallback(ChangesTraining, Callback):
    """Base for continual strategies: turns epoch hooks into experience hooks.

    ``on_experience_start`` runs at the first epoch of experience ``k`` (from
    ``on_train_epoch_start``), ``on_experience_end`` at its last epoch (from
    ``on_train_epoch_end``, after that epoch's validation, before the end-of-epoch
    checkpoint is written, so what it computes is in that checkpoint).

    Example::

        class PrintExperience(ExperienceCallback):
            def on_experience_end(self, trainer, pl_module, experience):
                print(f"finished experience {experience}")
    """

    # A strategy by default (ChangesTraining): part of what defines a run, so a resume
    # without it, or with it added, is refused. Dashboards set affects_training = False.

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        """Called before the first training epoch of ``experience``."""

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        """Called after the last training epoch of ``experience`` (and its validation)."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if is_experience_start(trainer):
            self.on_experience_start(trainer, pl_module, current_experience(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if is_experience_end(trainer):
            self.on_experience_end(trainer, pl_module, current_experience(trainer))

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # mneme 0.1.0 stored a callback's state under its class name; today's state keys
        # carry the identifying arguments. Move such a state to this callback's key (before
        # Lightning hands states to load_state_dict), so an older checkpoint loads.
        states = checkpoint.get("callbacks") or {}
        legacy = type(self).__qualname__
        if self.state_key != legacy and self.state_key not in states and legacy in states:
            states[self.state_key] = states.pop(legacy)
