"""A progress bar that shows where a run is in the stream."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from mneme.app.core.schedule import current_experience


class StreamProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, described by the stream position:
    ``Experience 2/5 · epoch 1/6``, with the loss (``train/loss``) beside it.

    The ``mneme`` CLI adds it when the progress bar is on, which by default it is only in an
    interactive terminal (off in CI logs and when output goes to a file).

    Example::

        trainer = Trainer(callbacks=[StreamProgressBar()])
    """

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        datamodule = trainer.datamodule
        epochs = datamodule.epochs_per_experience
        k = current_experience(trainer)
        self.train_progress_bar.set_description(
            f"Experience {k + 1}/{datamodule.num_experiences} · "
            f"epoch {trainer.current_epoch % epochs + 1}/{epochs}"
        )

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the version is in the log dir's name
        if "train/loss" in metrics:
            metrics["loss"] = metrics.pop("train/loss")
        return metrics
