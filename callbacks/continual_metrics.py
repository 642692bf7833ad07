"""The accuracy matrix of a continual run, and what follows from it, on the dashboard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from mneme.app.metrics import summarize
from mneme.datamodules.continual import experience_of

SUMMARY_KEYS = ("average_accuracy", "forgetting", "bwt", "fwt")


class ContinualMetrics(Callback):
    """Fills the accuracy matrix ``R[k, j]`` (after experience ``k``, on test experience ``j``)
    and reports average accuracy, forgetting, backward and forward transfer.

    Reads the module's ``experience_accuracy`` (a torchmetrics ``ExperienceAccuracy`` that the
    module's ``validation_step``/``test_step`` update per test experience, synced across
    ranks). Before training it evaluates the untrained model once: that row is the baseline
    of forward transfer. At each experience end it logs to TensorBoard a scalar per test
    experience (``continual/acc_exp<j>``, step = experience), the summary scalars and a
    heatmap of the matrix, and writes ``<log_dir>/continual_metrics.json``; at the end of
    ``fit`` and ``test`` it prints the table. ``test`` writes ``<log_dir>/test_metrics.json``.

    Example::

        trainer = Trainer(callbacks=[ContinualMetrics()])
    """

    def __init__(self, baseline: bool = True, print_table: bool = True) -> None:
        self.measure_baseline = baseline
        self.print_table = print_table
        self.rows: list[list[float]] = []
        self.baseline: list[float] | None = None

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "baseline": self.baseline}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [list(row) for row in state_dict["rows"]]
        self.baseline = state_dict["baseline"]

    def summary(self) -> dict[str, Any]:
        return summarize(self.rows, self.baseline)

    # -- hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.measure_baseline and self.baseline is None and trainer.current_epoch == 0:
            self.baseline = evaluate_stream(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        accuracy = _compute_and_reset(pl_module)
        if trainer.sanity_checking:
            return
        # Already synced by the metric; sync_dist only tells Lightning so (no warning).
        pl_module.log_dict({f"val/acc_exp{j}": a for j, a in enumerate(accuracy)}, sync_dist=True)
        if trainer.state.fn != TrainerFn.FITTING:  # `mneme validate`
            self._report(trainer, "validation", accuracy)
            return
        if (trainer.current_epoch + 1) % trainer.datamodule.epochs_per_experience:
            return
        k = experience_of(trainer)
        del self.rows[k:]
        self.rows.append(accuracy)
        self._log_experience(trainer, k)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, "test", _compute_and_reset(pl_module))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.rows:
            return
        summary = self.summary()
        for logger in trainer.loggers:
            logger.log_metrics({"hp_metric": summary["average_accuracy"]}, step=len(self.rows) - 1)
        if self.print_table:
            _print(format_summary(summary))

    # -- output ---------------------------------------------------------------------------
    def _log_experience(self, trainer: Trainer, k: int) -> None:
        summary = self.summary()
        scalars = {f"continual/acc_exp{j}": a for j, a in enumerate(self.rows[k])}
        scalars.update(
            {f"continual/{key}": summary[key] for key in SUMMARY_KEYS if summary[key] is not None}
        )
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=k)
            if isinstance(logger, TensorBoardLogger):
                _add_heatmap(logger, self.rows, k)
        _write_json(trainer, "continual_metrics.json", summary)

    def _report(self, trainer: Trainer, stage: str, accuracy: list[float]) -> None:
        seen = [a for a in accuracy if not math.isnan(a)]
        result = {
            "accuracy": [None if math.isnan(a) else a for a in accuracy],
            "average_accuracy": sum(seen) / len(seen) if seen else None,
            "ckpt_path": trainer.ckpt_path,
        }
        _write_json(trainer, f"{stage}_metrics.json", result)
        if self.print_table:
            cells = "  ".join(f"exp{j}={a:.3f}" for j, a in enumerate(accuracy))
            _print(f"{stage} accuracy: {cells}  average={result['average_accuracy']}")


@torch.no_grad()
def evaluate_stream(trainer: Trainer, pl_module: LightningModule) -> list[float]:
    """Accuracy on every test experience now, through the module's own ``validation_step``."""
    was_training = pl_module.training
    pl_module.eval()
    for j, loader in enumerate(trainer.datamodule.val_dataloader()):
        for i, batch in enumerate(loader):
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, j)
            pl_module.validation_step(batch, i, j)
    pl_module.train(was_training)
    return _compute_and_reset(pl_module)


def _compute_and_reset(pl_module: LightningModule) -> list[float]:
    metric = pl_module.experience_accuracy
    values = metric.compute().tolist()
    metric.reset()
    return values


def format_summary(summary: dict[str, Any]) -> str:
    """The accuracy matrix as a text table, with the summary figures below it."""
    rows = summary["accuracy_matrix"]
    header = "after exp | " + " ".join(f"exp{j:<4d}" for j in range(len(rows[0])))
    lines = ["Accuracy matrix (row: after training experience k; column: test experience j)"]
    lines += [header, "-" * len(header)]
    lines += [f"{k:>9d} | " + " ".join(f"{a:7.3f}" for a in row) for k, row in enumerate(rows)]
    figures = [
        f"{key}={summary[key]:.4f}" if summary[key] is not None else f"{key}=n/a"
        for key in SUMMARY_KEYS
    ]
    lines.append("  ".join(figures))
    return "\n".join(lines)


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


def _write_json(trainer: Trainer, name: str, payload: dict[str, Any]) -> None:
    log_dir = trainer.log_dir  # on every rank: under DDP this is a collective broadcast
    if log_dir is not None and trainer.is_global_zero:
        path = Path(log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, allow_nan=False))


@rank_zero_only
def _add_heatmap(logger: TensorBoardLogger, rows: list[list[float]], step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(rows[0]), 1 + 0.5 * len(rows)))
    image = ax.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis")
    for k, row in enumerate(rows):
        for j, a in enumerate(row):
            ax.text(j, k, f"{a:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xlabel("test experience j")
    ax.set_ylabel("after training experience k")
    fig.colorbar(image, ax=ax)
    logger.experiment.add_figure("continual/accuracy_matrix", fig, global_step=step)
    plt.close(fig)
