"""Experience-level hooks on top of Lightning's epoch hooks."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from mneme.datamodules.continual import experience_of


class ExperienceCallback(Callback):
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

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        """Called before the first training epoch of ``experience``."""

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        """Called after the last training epoch of ``experience`` (and its validation)."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch % trainer.datamodule.epochs_per_experience == 0:
            self.on_experience_start(trainer, pl_module, experience_of(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % trainer.datamodule.epochs_per_experience == 0:
            self.on_experience_end(trainer, pl_module, experience_of(trainer))
