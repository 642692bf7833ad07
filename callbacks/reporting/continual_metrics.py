"""The accuracy matrix of a continual run, and what follows from it, on the dashboard."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from mneme.app.core.metrics import summarize, summarize_perplexity
from mneme.app.core.schedule import current_experience, is_experience_end
from mneme.callbacks.reporting.accuracy_tables import (
    figure_keys,
    format_stage,
    format_summary,
    format_table,
    print_rank_zero,
    results_lines,
)
from mneme.callbacks.reporting.cost import ExperienceCost, format_cost
from mneme.callbacks.reporting.run_configuration import run_config
from mneme.callbacks.reporting.tensorboard_views import add_heatmap, add_layout, add_text_table
from mneme.callbacks.run_context import write_json

# The HParams tab's metrics: the final summary, under tags of their own (one point, at the
# last experience) so that they never mix with the per-experience `continual/*` series.
FINAL_PREFIX = "final/"


class ContinualMetrics(Callback):
    """Fills the accuracy matrix ``R[k, j]`` (after experience ``k``, on test experience ``j``)
    and reports average accuracy, forgetting, backward and forward transfer, the average
    incremental accuracy and, for a zero-shot model (ContrastiveAligner), the MTIL protocol's
    Transfer, Average and Last (see :mod:`mneme.app.core.metrics`).

    Reads the module's ``experience_accuracy`` (a torchmetrics ``ExperienceAccuracy`` that the
    module's ``validation_step``/``test_step`` update per test experience, synced across
    ranks). Before training it evaluates the untrained model once: that row is the baseline
    of forward transfer (for a zero-shot model, the zero-shot row of the MTIL figures). At
    each experience end it logs to TensorBoard a scalar per test experience trained so far
    (``continual/acc_exp<j>``, step = experience ``k >= j``), the summary scalars, a custom
    scalars layout of them (the Custom Scalars tab: one chart of every experience's
    accuracy, one of the summary), a heatmap of the
    matrix and the table as text, and writes ``<log_dir>/continual_metrics.json``; at the end
    of ``fit`` and ``test`` it prints the table. ``test`` writes ``<log_dir>/test_metrics.json``.

    With an :class:`~.cost.ExperienceCost` among the trainer's callbacks (the
    ``mneme`` CLI adds one, ``cost:``), its rows (parameters, training time, peak memory,
    checkpoint size per experience) go into the JSON as ``cost`` and are printed, and shown
    in the Text tab, as a second table right after the accuracy matrix.

    The JSON says whether the run is ``complete`` (every experience trained) with
    ``experiences_done`` of ``num_experiences``: a prefix (``trainer.max_epochs``), an early
    stop, or an interrupted run (SIGTERM, Ctrl-C, an error: ``"stopped_by"``) is not.

    A ``fit`` logs its run configuration once, at its end, as hyperparameters (TensorBoard's
    HParams tab): the model's class and arguments, the optimizer's class and arguments, each
    callback's class and arguments, the stream's arguments and the seed; its metrics are the
    final summary figures (``final/average_accuracy``, ...). ``test`` and ``validate`` log
    none, so they are no trials. ``hparams.yaml`` holds the same configuration.

    Example::

        trainer = Trainer(callbacks=[ContinualMetrics()])
    """

    def __init__(self, baseline: bool = True, print_table: bool = True) -> None:
        self.measure_baseline = baseline
        self.print_table = print_table
        self.rows: list[list[float]] = []
        self.baseline: list[float] | None = None
        # Row k of the perplexity matrix, beside ``rows``, when the module reports perplexity.
        self.perplexity_rows: list[list[float]] = []
        self.zero_shot = False
        self.run_config: dict[str, Any] = {}

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "baseline": self.baseline, "perplexity_rows": self.perplexity_rows
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [list(row) for row in state_dict["rows"]]
        self.baseline = state_dict["baseline"]
        self.perplexity_rows = [list(row) for row in state_dict.get("perplexity_rows", [])]

    def summary(self) -> dict[str, Any]:
        summary = summarize(self.rows, self.baseline, zero_shot=self.zero_shot)
        if self.perplexity_rows:  # a language model's (ContinualLM): lower is better
            summary.update(summarize_perplexity(self.perplexity_rows))
        return summary

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.zero_shot = is_zero_shot(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run_config = run_config(trainer, pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # What `hparams.yaml` holds; the logger writes it at its first save, right
                # after this hook, and never rewrites it.
                logger.hparams.update(self.run_config)
                add_layout(logger)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        accuracy = _compute_and_reset(pl_module)
        perplexity = _compute_and_reset(pl_module, "experience_perplexity")
        if trainer.sanity_checking:
            # The untrained model's row, the baseline of forward transfer: Lightning's own
            # validation pass before training (num_sanity_val_steps=-1, which
            # datamodule.trainer_settings() asks for), kept only when it saw every batch.
            full = list(trainer.num_sanity_val_batches) == list(trainer.num_val_batches)
            if self.measure_baseline and self.baseline is None and full:
                self.baseline = accuracy
            return
        # Already synced by the metric; sync_dist only tells Lightning so (no warning).
        pl_module.log_dict({f"val/acc_exp{j}": a for j, a in enumerate(accuracy)}, sync_dist=True)
        if perplexity is not None:
            ppl = {f"val/ppl_exp{j}": p for j, p in enumerate(perplexity)}
            pl_module.log_dict(ppl, sync_dist=True)
        if trainer.state.fn != TrainerFn.FITTING:  # `mneme validate`
            self._report(trainer, "validation", accuracy, perplexity)
            return
        if not is_experience_end(trainer):
            return
        k = current_experience(trainer)
        del self.rows[k:]
        self.rows.append(accuracy)
        if perplexity is not None:
            del self.perplexity_rows[k:]
            self.perplexity_rows.append(perplexity)
        self._log_experience(trainer, k)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        accuracy = _compute_and_reset(pl_module)
        perplexity = _compute_and_reset(pl_module, "experience_perplexity")
        self._report(trainer, "test", accuracy, perplexity)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.rows:
            return
        summary = self.summary()
        final = {FINAL_PREFIX + key: summary[key] for key in figure_keys(summary)}
        final = {key: value for key, value in final.items() if value is not None}
        step = len(self.rows) - 1
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # the HParams tab's metrics
                logger.log_hyperparams(self.run_config, metrics=final, step=step)
            else:  # CSV, MLflow, W&B, ... take the parameters alone
                logger.log_hyperparams(self.run_config)
                logger.log_metrics(final, step=step)
        # The JSON again: the last experience's checkpoint file exists only now.
        if (cost := cost_callback(trainer)) is not None:
            cost.record_checkpoint_files(trainer)
        write_json(trainer, "continual_metrics.json", {
            **self._progress(trainer), **summary, **_cost_payload(trainer),
        })  # fmt: skip
        if self.print_table:
            print_rank_zero(self._table_text(trainer, summary, results_lines(trainer, pl_module)))
        total = trainer.datamodule.num_experiences if trainer.datamodule else len(self.rows)
        if len(self.rows) < total:
            print_rank_zero(
                f"Incomplete: trained {len(self.rows)} of {total} experiences "
                f"(trainer.max_epochs={trainer.max_epochs}, or the run was stopped early)"
            )

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Mark the fit's JSON incomplete, saying what stopped it (Lightning calls this on
        every rank that raised, so no collective is used here)."""
        if trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero:
            return
        stopped_by = type(exception).__name__
        if trainer.received_sigterm:
            stopped_by = "SIGTERM"
        elif isinstance(exception, (KeyboardInterrupt, SystemExit)):
            stopped_by = "SIGINT"
        payload = self.summary() if self.rows else {"accuracy_matrix": []}
        payload.update(_cost_payload(trainer))
        log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
        write_json(trainer, "continual_metrics.json", {
            **self._progress(trainer), "stopped_by": stopped_by, **payload,
        }, log_dir=log_dir or trainer.default_root_dir)  # fmt: skip

    def _progress(self, trainer: Trainer) -> dict[str, Any]:
        total = trainer.datamodule.num_experiences if trainer.datamodule else len(self.rows)
        return {
            "complete": len(self.rows) == total,
            "experiences_done": len(self.rows),
            "num_experiences": total,
        }

    # -- output ---------------------------------------------------------------------------
    def _log_experience(self, trainer: Trainer, k: int) -> None:
        summary = self.summary()
        # Test experience j's series starts at the experience that trained it (its accuracy
        # and forgetting curve): the entries before are the untrained model's (zeros in a
        # class-incremental stream, in the matrix and its heatmap), and a series of zeros
        # ending at 0.93 is one that TensorBoard's "ignore outliers" scaling cuts at 0.45.
        scalars = {f"continual/acc_exp{j}": a for j, a in enumerate(self.rows[k]) if j <= k}
        scalars.update({f"continual/{key}": summary[key] for key in figure_keys(summary)})
        scalars = {key: value for key, value in scalars.items() if value is not None}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=k)
            if isinstance(logger, TensorBoardLogger):
                add_heatmap(logger, self.rows, k)
                if self.perplexity_rows:
                    add_heatmap(logger, self.perplexity_rows, k, "perplexity")
                add_text_table(logger, self._table_text(trainer, summary), k)
        write_json(trainer, "continual_metrics.json", {
            **self._progress(trainer), **summary, **_cost_payload(trainer),
        })  # fmt: skip

    def _table_text(
        self, trainer: Trainer, summary: dict[str, Any], results: Sequence[str] = ()
    ) -> str:
        """The accuracy table, the other callbacks' ``results`` lines under it, and the cost
        table after them when the run measures cost."""
        text = "\n".join([format_summary(summary), *results])
        rows = _cost_payload(trainer).get("cost")
        return f"{text}\n{format_cost(rows)}" if rows else text

    def _report(
        self, trainer: Trainer, stage: str, accuracy: list[float], perplexity: list | None = None
    ) -> None:
        seen = [a for a in accuracy if not math.isnan(a)]
        result = {
            "accuracy": [None if math.isnan(a) else a for a in accuracy],
            "average_accuracy": sum(seen) / len(seen) if seen else None,
            "ckpt_path": trainer.ckpt_path,
        }
        if perplexity is not None:
            result["perplexity"] = [None if math.isnan(p) else p for p in perplexity]
        write_json(trainer, f"{stage}_metrics.json", result)
        if self.print_table:
            print_rank_zero(format_stage(stage, accuracy, result["average_accuracy"]))
            if perplexity is not None:
                table = format_table([perplexity], [stage], "", "9.2f")
                print_rank_zero("\n".join(["Perplexity (column: test experience j)", *table]))


def continual_metrics(trainer: Trainer) -> ContinualMetrics | None:
    """The run's accuracy matrix keeper: the first ``ContinualMetrics`` of the trainer."""
    return next((c for c in trainer.callbacks if isinstance(c, ContinualMetrics)), None)


def cost_callback(trainer: Trainer) -> ExperienceCost | None:
    """The run's cost meter: the first ``ExperienceCost`` among the trainer's callbacks."""
    return next((c for c in trainer.callbacks if isinstance(c, ExperienceCost)), None)


def _cost_payload(trainer: Trainer) -> dict[str, Any]:
    """``{"cost": [row per experience done]}``, or nothing when the run measures no cost."""
    cost = cost_callback(trainer)
    return {} if cost is None else {"cost": [dict(row) for row in cost.rows]}


def _compute_and_reset(pl_module: LightningModule, name: str = "experience_accuracy"):
    """The module's per-experience metric ``name`` as a list, reset; ``None`` when the
    module has none (only language models report ``experience_perplexity``)."""
    metric = getattr(pl_module, name, None)
    if metric is None:
        return None
    # torchmetrics squeezes a one-element result to a scalar: a stream of one experience
    values = torch.atleast_1d(metric.compute()).tolist()
    metric.reset()
    return values


def is_zero_shot(pl_module: LightningModule) -> bool:
    """Whether the module classifies zero-shot (a ContrastiveAligner): experiences it never
    trained on are classified by class prompts, so the MTIL figures apply."""
    aligner = sys.modules.get("mneme.app.models.aligner")  # not imported: the module is none
    return aligner is not None and isinstance(pl_module, aligner.ContrastiveAligner)
