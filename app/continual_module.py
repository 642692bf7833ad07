"""What every Mneme LightningModule shares: the extension points strategies use, the
experience bookkeeping, and cheap logging."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from mneme.app.metrics import ExperienceAccuracy
from mneme.datamodules.continual import experience_of
from torch import Tensor

Batch = dict[str, Tensor]
# A named extra loss a callback registers: (batch, outputs) -> scalar. ``outputs`` holds what
# the module's forward pass produced (``logits``, ``features`` or ``embeddings``).
LossTerm = Callable[[Batch, dict[str, Tensor]], Tensor]
BatchTransform = Callable[[Batch], Batch]


class ContinualModule(LightningModule):
    """Base of the continual modules.

    Strategy callbacks act through two extension points they fill at ``setup``:
    ``loss_terms`` (named extra losses, summed into the loss and logged as
    ``train/loss_<name>``) and ``batch_transforms`` (applied to each training batch on the
    device before the forward pass, e.g. replay). ``ContinualMetrics`` reads
    ``experience_accuracy``, which subclasses update in ``validation_step``/``test_step``.
    ``FiniteLossGuard`` reads ``last_loss_terms`` to name a term that turned non-finite.

    Subclasses implement ``observe_experience`` (called at every training epoch start with
    the running experience; it must be idempotent, so a resumed run is right) and build
    ``experience_accuracy`` in ``setup``.
    """

    def __init__(self, optimizer: OptimizerCallable, reset_optimizer: bool) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.reset_optimizer = reset_optimizer
        self.loss_terms: dict[str, LossTerm] = {}
        self.batch_transforms: dict[str, BatchTransform] = {}
        self.last_loss_terms: dict[str, Tensor] = {}
        self.experience_accuracy: ExperienceAccuracy | None = None

    def observe_experience(self, classes: Sequence[int], tasks: Sequence[int]) -> None:
        """Record what the running experience brings: its classes and task labels."""

    def on_train_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        k = experience_of(self.trainer)
        experience = datamodule.train_experiences[k]
        self.observe_experience(experience.classes, experience.tasks)
        first_epoch = self.trainer.current_epoch % datamodule.epochs_per_experience == 0
        if self.reset_optimizer and first_epoch and k > 0:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()  # Lightning keeps one optimizer for the whole fit

    def transform_batch(self, batch: Batch) -> Batch:
        for transform in self.batch_transforms.values():
            batch = transform(batch)
        return batch

    def total_loss(
        self, terms: dict[str, Tensor], batch: Batch, outputs: dict, extra_logs: dict | None = None
    ) -> Tensor:
        """Sum the module's own loss ``terms`` and the registered ``loss_terms``; log them."""
        terms = {**terms, **{name: term(batch, outputs) for name, term in self.loss_terms.items()}}
        loss = sum(terms.values())
        self.last_loss_terms = {name: value.detach() for name, value in terms.items()}
        if self.is_logging_step():
            logs = {f"train/loss_{name}": value for name, value in terms.items()}
            self.log_dict({**logs, **(extra_logs or {})}, batch_size=len(batch["label"]))
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def is_logging_step(self) -> bool:
        """Whether this step's values reach a logger. ``self.log`` costs about half a
        millisecond a call on a CPU (Lightning's result bookkeeping), as much as a small
        model's whole step, so values that would be dropped are not logged at all."""
        trainer = self.trainer
        return (trainer.global_step + 1) % trainer.log_every_n_steps == 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        try:
            return self.optimizer_factory(self.optimizer_parameters())
        except (ValueError, TypeError) as err:  # e.g. torch's "Invalid learning rate: -1.0"
            raise ValueError(f"model.optimizer: {err}") from err

    def optimizer_parameters(self):
        return self.parameters()
