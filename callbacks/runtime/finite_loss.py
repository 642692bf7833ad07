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
    last), the weights are checked as well: a checkpoint of non-finite weights is never
    written. Weights can also be finite yet diverged (magnitudes of 1e30 whose next forward
    pass overflows): a checkpoint counts as good only once a step after it gave a finite
    loss, so when the first step after a save diverges, that save is not named as good,
    and the newest earlier experience checkpoint is (it was followed by finite steps).

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

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the newest checkpoint holds the weights this epoch starts from: unconfirmed until
        # a step on them gives a finite loss
        self._save_unconfirmed = True

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"weights became non-finite ({', '.join(bad[:3])}) in epoch "
                f"{trainer.current_epoch} (experience {current_experience(trainer)}); not "
                f"saved. {self._last_good(trainer)}Lower the learning rate."
            )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor):
        if trainer.global_step % self.check_every_n_steps:
            return
        if torch.isfinite(loss).all():
            self._save_unconfirmed = False
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
            + self._last_good(trainer, confirmed=not getattr(self, "_save_unconfirmed", False))
            + "Lower the learning rate or the weight of that term."
        )

    @staticmethod
    def _last_good(trainer: Trainer, confirmed: bool = True) -> str:
        """The checkpoint to go back to: the last one written (finite weights, checked at
        its epoch end), unless its weights gave the failing loss at the first step after it
        (not ``confirmed``): then the newest earlier experience checkpoint beside it."""
        checkpoint = trainer.checkpoint_callback
        saved = checkpoint.last_model_path if checkpoint else ""
        if not saved or not Path(saved).is_file():
            return "No checkpoint was saved yet. "
        if confirmed:
            return f"Last good checkpoint: {saved}. "
        earlier = [p for p in Path(saved).parent.glob("experience=*.ckpt") if not p.samefile(saved)]
        earlier.sort(key=lambda p: int(p.stem.split("=")[1]) if p.stem[11:].isdigit() else -1)
        where = f"Last good checkpoint: {earlier[-1]}. " if earlier else "No good checkpoint. "
        return f"{saved} holds the weights that gave this loss (diverged, not good). {where}"


def non_finite_fields(batch: Any) -> list[str]:
    """The floating-point fields of a batch (a dict, or a sequence) that hold NaN or inf."""
    items = batch.items() if isinstance(batch, dict) else enumerate(batch or ())
    return [
        str(key)
        for key, value in items
        if isinstance(value, Tensor) and value.is_floating_point() and not value.isfinite().all()
    ]
