"""Stop a run whose loss turns NaN or infinite, before the bad step touches the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from mneme.app.core.errors import ConfigError, MnemeError
from mneme.app.core.schedule import current_experience
from torch import Tensor


class NonFiniteLossError(MnemeError, RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteDataError(ConfigError):
    """A training batch holds NaN or infinite values: the data is at fault, not training."""


class FiniteLossGuard(Callback):
    """Raises before ``backward`` when the loss is not finite, naming the step, the
    experience and the loss terms at fault, and telling data from divergence: a batch whose
    inputs hold NaN or inf blames the data (``NonFiniteDataError``), finite inputs blame
    training (the learning rate, a loss term's weight).

    At each epoch end, before the checkpoint is written (Lightning runs checkpoint callbacks
    last), the weights are checked as well: a checkpoint of diverged weights is never
    written, so the "last good checkpoint" the error names holds finite weights.

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

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx  # read only if the loss goes bad

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"weights became non-finite ({', '.join(bad[:3])}) in epoch "
                f"{trainer.current_epoch} (experience {current_experience(trainer)}); not "
                f"saved. {self._last_good(trainer)}Lower the learning rate."
            )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor):
        if trainer.global_step % self.check_every_n_steps or torch.isfinite(loss).all():
            return
        fields = non_finite_fields(getattr(self, "_batch", None))
        if fields:
            raise NonFiniteDataError(
                f"data: training batch {getattr(self, '_batch_idx', '?')} of experience "
                f"{current_experience(trainer)} (epoch {trainer.current_epoch}) holds NaN or "
                f"inf in {', '.join(fields)}, so the loss became {loss.item()}: the data is at "
                "fault, not training; clean the dataset (data.benchmark_args)"
            )
        diverged = any(not torch.isfinite(p).all() for p in pl_module.parameters())
        terms = getattr(pl_module, "last_loss_terms", {}) or {}
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        state = "the weights had already diverged" if diverged else "stopped before the update"
        raise NonFiniteLossError(
            f"loss became {loss.item()} at step {trainer.global_step} (experience "
            f"{current_experience(trainer)}, epoch {trainer.current_epoch}) on finite data; "
            f"non-finite term(s): {', '.join(bad) or 'unknown'}; {state}. "
            + self._last_good(trainer)
            + "Lower the learning rate or the weight of that term."
        )

    @staticmethod
    def _last_good(trainer: Trainer) -> str:
        """The checkpoint to go back to: the last one written, whose weights this guard
        checked at its epoch end."""
        checkpoint = trainer.checkpoint_callback
        saved = checkpoint.last_model_path if checkpoint else ""
        if saved and Path(saved).is_file():
            return f"Last good checkpoint: {saved}. "
        return "No checkpoint was saved yet. "


def non_finite_fields(batch: Any) -> list[str]:
    """The floating-point fields of a batch (a dict, or a sequence) that hold NaN or inf."""
    items = batch.items() if isinstance(batch, dict) else enumerate(batch or ())
    return [
        str(key)
        for key, value in items
        if isinstance(value, Tensor) and value.is_floating_point() and not value.isfinite().all()
    ]
