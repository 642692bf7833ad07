"""Where a run is: a progress bar in a terminal, plain progress lines anywhere else."""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from mneme.app.core.schedule import current_experience, is_experience_end


class StreamProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, described by the stream position:
    ``Experience 2/5 · epoch 1/6``, with the loss (``train/loss``) beside it.

    The ``mneme`` CLI adds it when the progress bar is on, which by default it is only in an
    interactive terminal (off in CI logs and when output goes to a file); there it adds
    :class:`ProgressLines` instead.

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


class ProgressLines(Callback):
    """Progress as plain lines on stderr, for a console without a progress bar (a CI log, a
    redirected run), so that long work never looks like a hang:

    - a ``fit`` over a stream: one line per experience end, with the time since the fit
      started, an estimate of the time left (the mean time per experience so far, times
      the experiences left) and the row of the accuracy matrix just measured
      (``ContinualMetrics``'s, when it is among the trainer's callbacks);
    - a ``fit`` without experiences (few-shot meta-training): one line per epoch;
    - an evaluation (``mneme test``/``validate``, ``mneme fewshot test``, and the test a
      few-shot ``fit`` ends with): one line every ``every_batches`` batches (episodes, for
      few-shot loaders) and at the last one.

    Args:
        every_batches: evaluation batches between two lines.

    Example::

        trainer = Trainer(enable_progress_bar=False, callbacks=[ProgressLines()])
    """

    def __init__(self, every_batches: int = 200) -> None:
        if every_batches < 1:
            raise ValueError(f"ProgressLines.every_batches: >= 1, got {every_batches}")
        self.every_batches = every_batches
        self._start: float | None = None
        self._first: int = 0  # the experience (or epoch) this process started at
        self._done = 0  # evaluation batches done in the running evaluation

    # -- fit --------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()
        self._first = self._position(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._start is None or trainer.sanity_checking:
            return
        data = trainer.datamodule
        stream = hasattr(data, "epochs_per_experience") and hasattr(data, "num_experiences")
        if stream and not is_experience_end(trainer):
            return
        position, total = self._position(trainer), self._total(trainer)
        what = "Experience" if stream else "Epoch"
        line = f"{what} {position + 1}/{total} done · {self._times(position + 1, total)}"
        row = self._matrix_row(trainer, position) if stream else None
        if row:
            line += " · accuracy row: " + " ".join(f"{a:.3f}" for a in row)
        _say(line)

    def _position(self, trainer: Trainer) -> int:
        data = trainer.datamodule
        if hasattr(data, "epochs_per_experience"):
            return current_experience(trainer)
        return trainer.current_epoch

    def _total(self, trainer: Trainer) -> int | str:
        data = trainer.datamodule
        if hasattr(data, "num_experiences") and hasattr(data, "epochs_per_experience"):
            return data.num_experiences
        return trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"

    def _times(self, done: int, total: int | str) -> str:
        elapsed = time.perf_counter() - self._start
        here = done - self._first
        if not isinstance(total, int) or here <= 0:
            return f"{_clock(elapsed)} elapsed"
        left = elapsed / here * max(total - done, 0)
        return f"{_clock(elapsed)} elapsed, ETA {_clock(left)}"

    @staticmethod
    def _matrix_row(trainer: Trainer, k: int) -> list[float] | None:
        from mneme.callbacks.reporting.continual_metrics import ContinualMetrics

        metrics = next((c for c in trainer.callbacks if isinstance(c, ContinualMetrics)), None)
        if metrics is None or len(metrics.rows) <= k:
            return None
        return metrics.rows[k]

    # -- evaluations ------------------------------------------------------------------------
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_evaluation()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # a fit's validations: its experience lines
            self._start_evaluation()

    def on_test_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._count(trainer, "Test", trainer.num_test_batches)

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.state.fn != TrainerFn.FITTING and not trainer.sanity_checking:
            self._count(trainer, "Validation", trainer.num_val_batches)

    def _start_evaluation(self) -> None:
        self._eval_start, self._done = time.perf_counter(), 0

    def _count(self, trainer: Trainer, stage: str, batches: list[int | float]) -> None:
        self._done += 1
        total = int(sum(b for b in batches if b != float("inf")))
        if self._done % self.every_batches and self._done != total:
            return
        elapsed = time.perf_counter() - self._eval_start
        # a few-shot loader's batch is one episode unless it groups several (tasks_per_batch)
        unit = "episodes" if getattr(trainer.datamodule, "tasks_per_batch", 0) == 1 else "batches"
        times = f"{_clock(elapsed)} elapsed"
        if total and self._done < total:
            times += f", ETA {_clock(elapsed / self._done * (total - self._done))}"
        _say(f"{stage}: {self._done}/{total} {unit} · {times}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@rank_zero_only
def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
