"""Stop a run whose loss turns NaN or infinite, before the bad step touches the weights."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from mneme.datamodules.errors import ConfigError, MnemeError
from mneme.datamodules.schedule import current_experience
from torch import Tensor


class NonFiniteLossError(MnemeError, RuntimeError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(Callback):
    """Raises before ``backward`` when the loss is not finite, naming the step, the
    experience and the loss terms at fault.

    Checking before ``backward`` keeps the NaN out of the weights and the optimizer state;
    checkpoints already written (``last.ckpt`` from the previous epoch end) stay the last
    good ones, since ``ModelCheckpoint`` does not save on an exception by default.
    Lightning's ``EarlyStopping(check_finite=True)`` only looks at a monitored metric at
    validation time, after the damage; this looks at every step.

    The module may expose ``last_loss_terms`` (name -> detached value) to have the term
    named; ``ContinualClassifier`` does.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.FiniteLossGuard
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ConfigError(
                f"FiniteLossGuard.check_every_n_steps: must be at least 1, got "
                f"{check_every_n_steps}"
            )
        self.check_every_n_steps = check_every_n_steps

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor):
        if trainer.global_step % self.check_every_n_steps or torch.isfinite(loss).all():
            return
        terms = getattr(pl_module, "last_loss_terms", {}) or {}
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        saved = trainer.checkpoint_callback and trainer.checkpoint_callback.last_model_path
        raise NonFiniteLossError(
            f"loss became {loss.item()} at step {trainer.global_step} (experience "
            f"{current_experience(trainer)}, epoch {trainer.current_epoch}); non-finite term(s): "
            f"{', '.join(bad) or 'unknown'}. Stopped before the update; "
            + (f"last good checkpoint: {saved}. " if saved else "no checkpoint was saved yet. ")
            + "Lower the learning rate or the weight of that term."
        )
