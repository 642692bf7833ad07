"""The accuracy matrix of a continual run, and what follows from it, on the dashboard."""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from mneme.app.core.metrics import summarize
from mneme.app.core.schedule import current_experience, is_experience_end
from mneme.callbacks.reporting.cost import ExperienceCost, format_cost

SUMMARY_KEYS = ("average_accuracy", "forgetting", "bwt", "fwt", "average_incremental_accuracy")
# MTIL figures (ZSCL), only for zero-shot models; zero_shot_transfer is their reference.
MTIL_KEYS = ("mtil_transfer", "mtil_average", "mtil_last", "zero_shot_transfer")
# The HParams tab's metrics: the final summary, under tags of their own (one point, at the
# last experience) so that they never mix with the per-experience `continual/*` series.
FINAL_PREFIX = "final/"
# Optimizer defaults that only pick an implementation, not the optimization.
OPTIMIZER_SWITCHES = ("foreach", "fused", "differentiable", "capturable")
# Arguments the one-line overview of a run names even at their defaults: what is trained on
# what, and the learning rate.
ALWAYS_DESCRIBED = (
    "benchmark",
    "benchmark_args",
    "epochs_per_experience",
    "encoder",
    "encoders",
    "lr",
)


class ContinualMetrics(Callback):
    """Fills the accuracy matrix ``R[k, j]`` (after experience ``k``, on test experience ``j``)
    and reports average accuracy, forgetting, backward and forward transfer, the average
    incremental accuracy and, for a zero-shot model (ContrastiveAligner), the MTIL protocol's
    Transfer, Average and Last (see :mod:`mneme.app.core.metrics`).

    Reads the module's ``experience_accuracy`` (a torchmetrics ``ExperienceAccuracy`` that the
    module's ``validation_step``/``test_step`` update per test experience, synced across
    ranks). Before training it evaluates the untrained model once: that row is the baseline
    of forward transfer (for a zero-shot model, the zero-shot row of the MTIL figures). At
    each experience end it logs to TensorBoard a scalar per test experience
    (``continual/acc_exp<j>``, step = experience), the summary scalars, a heatmap of the
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
        self.zero_shot = False
        self.run_config: dict[str, Any] = {}

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "baseline": self.baseline}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [list(row) for row in state_dict["rows"]]
        self.baseline = state_dict["baseline"]

    def summary(self) -> dict[str, Any]:
        return summarize(self.rows, self.baseline, zero_shot=self.zero_shot)

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

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        accuracy = _compute_and_reset(pl_module)
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
        if trainer.state.fn != TrainerFn.FITTING:  # `mneme validate`
            self._report(trainer, "validation", accuracy)
            return
        if not is_experience_end(trainer):
            return
        k = current_experience(trainer)
        del self.rows[k:]
        self.rows.append(accuracy)
        self._log_experience(trainer, k)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, "test", _compute_and_reset(pl_module))

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
        if self.print_table:
            _print(self._table_text(trainer, summary))
        total = trainer.datamodule.num_experiences if trainer.datamodule else len(self.rows)
        if len(self.rows) < total:
            _print(
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
        _write_json(trainer, "continual_metrics.json", {
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
        scalars = {f"continual/acc_exp{j}": a for j, a in enumerate(self.rows[k])}
        scalars.update({f"continual/{key}": summary[key] for key in figure_keys(summary)})
        scalars = {key: value for key, value in scalars.items() if value is not None}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=k)
            if isinstance(logger, TensorBoardLogger):
                _add_heatmap(logger, self.rows, k)
                _add_table(logger, self._table_text(trainer, summary), k)
        _write_json(trainer, "continual_metrics.json", {
            **self._progress(trainer), **summary, **_cost_payload(trainer),
        })  # fmt: skip

    def _table_text(self, trainer: Trainer, summary: dict[str, Any]) -> str:
        """The accuracy table, and the cost table after it when the run measures cost."""
        text = format_summary(summary)
        rows = _cost_payload(trainer).get("cost")
        return f"{text}\n{format_cost(rows)}" if rows else text

    def _report(self, trainer: Trainer, stage: str, accuracy: list[float]) -> None:
        seen = [a for a in accuracy if not math.isnan(a)]
        result = {
            "accuracy": [None if math.isnan(a) else a for a in accuracy],
            "average_accuracy": sum(seen) / len(seen) if seen else None,
            "ckpt_path": trainer.ckpt_path,
        }
        _write_json(trainer, f"{stage}_metrics.json", result)
        if self.print_table:
            _print(format_stage(stage, accuracy, result["average_accuracy"]))


def cost_callback(trainer: Trainer) -> ExperienceCost | None:
    """The run's cost meter: the first ``ExperienceCost`` among the trainer's callbacks."""
    return next((c for c in trainer.callbacks if isinstance(c, ExperienceCost)), None)


def _cost_payload(trainer: Trainer) -> dict[str, Any]:
    """``{"cost": [row per experience done]}``, or nothing when the run measures no cost."""
    cost = cost_callback(trainer)
    return {} if cost is None else {"cost": [dict(row) for row in cost.rows]}


def _compute_and_reset(pl_module: LightningModule) -> list[float]:
    metric = pl_module.experience_accuracy
    # torchmetrics squeezes a one-element result to a scalar: a stream of one experience
    values = torch.atleast_1d(metric.compute()).tolist()
    metric.reset()
    return values


def figure_keys(summary: dict[str, Any]) -> list[str]:
    """The summary's scalar figures, in the order they are printed and logged."""
    return [key for key in (*SUMMARY_KEYS, *MTIL_KEYS) if key in summary]


def _table(rows: list[list[float]], labels: list[str], corner: str) -> list[str]:
    header = f"{corner:>9} | " + " ".join(f"exp{j:<4d}" for j in range(len(rows[0])))
    lines = [header, "-" * len(header)]
    lines += [
        f"{label:>9} | " + " ".join(f"{a:7.3f}" for a in row)
        for label, row in zip(labels, rows, strict=True)
    ]
    return lines


def _figures(summary: dict[str, Any], keys) -> str:
    return "  ".join(
        f"{key}={summary[key]:.4f}" if summary.get(key) is not None else f"{key}=n/a"
        for key in keys
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The accuracy matrix as a text table, with the summary figures below it; for a
    zero-shot model the zero-shot row (the untrained model) heads the matrix and the MTIL
    figures follow."""
    rows, labels = (
        summary["accuracy_matrix"],
        [str(k) for k in range(len(summary["accuracy_matrix"]))],
    )
    mtil = "mtil_transfer" in summary
    if mtil and summary.get("baseline") is not None:
        rows, labels = [summary["baseline"], *rows], ["zero-shot", *labels]
    lines = ["Accuracy matrix (row: after training experience k; column: test experience j)"]
    lines += _table(rows, labels, "after exp")
    lines.append(_figures(summary, ("average_accuracy", "forgetting", "bwt", "fwt")))
    lines.append(_figures(summary, ("average_incremental_accuracy",)))
    if mtil:
        lines.append("MTIL (ZSCL): " + _figures(summary, MTIL_KEYS))
    return "\n".join(lines)


def format_stage(stage: str, accuracy: list[float], average: float | None) -> str:
    """One evaluation (``mneme test``/``validate``) as the same table as ``fit``'s."""
    lines = [f"{stage.capitalize()} accuracy (column: test experience j)"]
    lines += _table([accuracy], [stage], "")
    lines.append(_figures({"average_accuracy": average}, ("average_accuracy",)))
    return "\n".join(lines)


def is_zero_shot(pl_module: LightningModule) -> bool:
    """Whether the module classifies zero-shot (a ContrastiveAligner): experiences it never
    trained on are classified by class prompts, so the MTIL figures apply."""
    aligner = sys.modules.get("mneme.app.models.aligner")  # not imported: the module is none
    return aligner is not None and isinstance(pl_module, aligner.ContrastiveAligner)


# -- the run configuration, as hyperparameters ----------------------------------------------
def run_config(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """What tells one run from another. One line each, the arguments that differ from their
    defaults: ``Callbacks`` (``"Replay(buffer_size=200)"``, ``"none"``), ``Data``, ``Model``,
    ``Optimizer``, and ``Seed`` (capitalized: they sort first, and the HParams tab shows its
    first five columns); then nested, every argument (loggers flatten them with ``/``):
    ``model`` (class and hyperparameters), ``optimizer`` (class and arguments), ``callbacks``
    (each callback's ``__init__`` arguments, by class) and ``data`` (the datamodule's
    hyperparameters). The trainer's bookkeeping callbacks (progress bar, checkpoints,
    summaries, the cost meter, this one) are left out."""
    overview: dict[str, Any] = {}
    config: dict[str, Any] = {}
    callbacks: dict[str, Any] = {}
    described = []
    for callback in trainer.callbacks:
        if _is_bookkeeping(callback):
            continue
        name = type(callback).__name__
        key = name if name not in callbacks else f"{name}_{len(callbacks)}"
        callbacks[key] = _init_arguments(callback)
        described.append(_call(name, _changed(type(callback), callbacks[key])))
    overview["Callbacks"] = ", ".join(described) or "none"
    config["callbacks"] = callbacks
    if trainer.datamodule is not None:
        config["data"] = _module_config(trainer.datamodule)
        overview["Data"] = _call(
            type(trainer.datamodule).__name__, _changed(type(trainer.datamodule), config["data"])
        )
    config["model"] = _module_config(pl_module)
    overview["Model"] = _call(type(pl_module).__name__, _changed(type(pl_module), config["model"]))
    for i, optimizer in enumerate(trainer.optimizers):
        key = "optimizer" if i == 0 else f"optimizer{i}"
        config[key] = _optimizer_config(optimizer)
        overview[key.capitalize()] = _call(
            type(optimizer).__name__, _changed(type(optimizer), config[key])
        )
    if "PL_GLOBAL_SEED" in os.environ:  # what seed_everything set
        overview["Seed"] = int(os.environ["PL_GLOBAL_SEED"])
    return {**overview, **config}


def _call(name: str, arguments: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_config(module) -> dict[str, Any]:
    hparams = dict(module.hparams)
    config = {"class": hparams.get("_class_path") or _class_path(type(module))}
    config.update({k: _plain(v) for k, v in hparams.items() if not k.startswith("_")})
    return config


def _optimizer_config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    cls = type(optimizer)
    path = _class_path(cls)
    if getattr(torch.optim, cls.__name__, None) is cls:
        path = f"torch.optim.{cls.__name__}"
    arguments = {
        k: _plain(v)
        for k, v in optimizer.defaults.items()
        if k not in OPTIMIZER_SWITCHES and v is not None
    }
    return {"class": path, **arguments}


def _parameters(cls: type) -> list[inspect.Parameter]:
    """The named ``__init__`` parameters of ``cls``."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p for p in parameters if p.name != "self" and p.kind not in skip]


def _init_arguments(obj: Any) -> dict[str, Any]:
    """The ``__init__`` arguments an object holds as attributes of the same name."""
    names = [p.name for p in _parameters(type(obj)) if hasattr(obj, p.name)]
    return {name: _plain(getattr(obj, name)) for name in names}


def _changed(cls: type, arguments: dict[str, Any]) -> dict[str, Any]:
    """The ``arguments`` that differ from the defaults of ``cls.__init__`` (and those of
    ``ALWAYS_DESCRIBED``)."""
    defaults = {p.name: p.default for p in _parameters(cls)}
    return {
        name: value
        for name, value in arguments.items()
        if name in defaults
        and (
            name in ALWAYS_DESCRIBED
            or defaults[name] is inspect.Parameter.empty
            or _plain(defaults[name]) != value
        )
    }


def _is_bookkeeping(callback: Callback) -> bool:
    from lightning.pytorch.callbacks import Checkpoint, ModelSummary, ProgressBar
    from lightning.pytorch.cli import SaveConfigCallback
    from mneme.callbacks.runtime.cpu_threads import AutoCpuThreads
    from mneme.callbacks.runtime.finite_loss import FiniteLossGuard

    kinds = (Checkpoint, ModelSummary, ProgressBar, SaveConfigCallback, FiniteLossGuard,
             AutoCpuThreads)  # fmt: skip
    return isinstance(callback, (*kinds, ContinualMetrics, ExperienceCost))


def _plain(value: Any) -> Any:
    """A value as YAML and TensorBoard take it: scalars, lists and dicts of them, else text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


def _write_json(
    trainer: Trainer, name: str, payload: dict[str, Any], log_dir: str | None = None
) -> None:
    """Write ``payload`` as ``<log_dir>/name`` on rank 0; without ``log_dir``, the trainer's
    (on every rank: under DDP, ``trainer.log_dir`` is a collective broadcast)."""
    log_dir = log_dir or trainer.log_dir
    if log_dir is not None and trainer.is_global_zero:
        path = Path(log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, allow_nan=False))


@rank_zero_only
def _add_table(logger: TensorBoardLogger, table: str, step: int) -> None:
    """The printed table in the Text tab (monospace: a Markdown code block): exact values,
    which no smoothing touches."""
    logger.experiment.add_text("continual/table", "    " + table.replace("\n", "\n    "), step)


@rank_zero_only
def _add_heatmap(logger: TensorBoardLogger, rows: list[list[float]], step: int) -> None:
    """The matrix as an image, every row of the stream (rows not trained yet blank), values in
    text that contrasts with each cell's color, legible at TensorBoard's default size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = len(rows[0])
    grid = np.full((columns, columns), np.nan)
    grid[: len(rows)] = rows
    # TensorBoard shows an image at its card's width (about 350 px), whatever its size: text
    # is sized to the cells and the figure, so that it stays about 12 px high there.
    cell = min(1.0, 8.0 / columns)  # inches, at 100 dpi
    width = 1.2 + 1.2 * cell * columns
    fontsize, labelsize = 21.0 * cell, 2.4 * width
    fig, ax = plt.subplots(figsize=(width, 1.0 + cell * columns), dpi=100)
    cmap = plt.get_cmap("viridis")
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap=cmap)
    ax.set_facecolor("#eeeeee")  # rows not trained yet
    for k, row in enumerate(rows):
        for j, a in enumerate(row):
            if math.isnan(a):
                continue
            red, green, blue, _ = cmap(a)
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, k, f"{a:.2f}", ha="center", va="center", fontsize=fontsize,
                    fontweight="bold", color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(columns))
    ax.set_yticks(range(columns))
    ax.tick_params(labelsize=labelsize)
    ax.set_xlabel("test experience j", fontsize=labelsize)
    ax.set_ylabel("after experience k", fontsize=labelsize)
    ax.set_title(f"accuracy, after experience {step}", fontsize=labelsize)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, ticks=[0, 0.5, 1])
    bar.ax.tick_params(labelsize=labelsize)
    fig.tight_layout(pad=0.3)
    logger.experiment.add_figure("continual/accuracy_matrix", fig, global_step=step)
    plt.close(fig)
