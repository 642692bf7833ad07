"""The accuracy matrix of a continual run, and what follows from it, on the dashboard."""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from mneme.app.core.metrics import summarize, summarize_perplexity
from mneme.app.core.schedule import current_experience, is_experience_end
from mneme.callbacks.base import affects_training
from mneme.callbacks.reporting.cli_config import cli_callback_arguments
from mneme.callbacks.reporting.cost import ExperienceCost, format_cost
from mneme.callbacks.run_context import write_json

SUMMARY_KEYS = ("average_accuracy", "forgetting", "bwt", "fwt", "average_incremental_accuracy")
# MTIL figures (ZSCL), only for zero-shot models; zero_shot_transfer is their reference.
MTIL_KEYS = ("mtil_transfer", "mtil_average", "mtil_last", "zero_shot_transfer")
# Perplexity figures (lower is better), for modules with ``experience_perplexity`` (ContinualLM).
PERPLEXITY_KEYS = (
    "average_perplexity", "perplexity_forgetting", "perplexity_bwt", "general_perplexity_rise"
)  # fmt: skip
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
                _add_layout(logger)

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
            _print(self._table_text(trainer, summary, results_lines(trainer, pl_module)))
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
                _add_heatmap(logger, self.rows, k)
                if self.perplexity_rows:
                    _add_heatmap(logger, self.perplexity_rows, k, "perplexity")
                _add_table(logger, self._table_text(trainer, summary), k)
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
            _print(format_stage(stage, accuracy, result["average_accuracy"]))
            if perplexity is not None:
                table = _table([perplexity], [stage], "", "9.2f")
                _print("\n".join(["Perplexity (column: test experience j)", *table]))


class ReportsResults(Protocol):
    """A callback whose results a config exists for, printed under the accuracy matrix at
    the end of a ``fit`` (the pruned sparsity, the int8 matrix of QAT, the robust matrix,
    MMD's next-domain accuracy): ``ContinualMetrics`` calls ``report_lines`` on every
    callback of the trainer that has it."""

    def report_lines(self, trainer: Trainer, pl_module: LightningModule) -> list[str]: ...


def results_lines(trainer: Trainer, pl_module: LightningModule) -> list[str]:
    """The ``report_lines`` of the trainer's callbacks (:class:`ReportsResults`), in their
    order; a callback with nothing to say returns none."""
    lines: list[str] = []
    for callback in trainer.callbacks:
        report = getattr(callback, "report_lines", None)
        if callable(report):
            lines += report(trainer, pl_module)
    return lines


def continual_metrics(trainer: Trainer) -> ContinualMetrics | None:
    """The run's accuracy matrix keeper: the first ``ContinualMetrics`` of the trainer."""
    return next((c for c in trainer.callbacks if isinstance(c, ContinualMetrics)), None)


def format_matrix(title: str, rows: list[list[float]], labels: Sequence[Any] | None = None,
                  summary: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """Another accuracy matrix (int8, robust) as the printed one: ``title``, a row per
    experience (``labels``: the experiences the rows were measured after, default 0..),
    and the summary figures it has below."""
    if not rows:
        return []
    labels = [str(k) for k in (range(len(rows)) if labels is None else labels)]
    lines = [title, *_table(rows, labels, "after exp")]
    summary = summary or {}
    keys = [k for k in ("average_accuracy", "forgetting", "bwt") if summary.get(k) is not None]
    if keys:
        lines.append(_figures(summary, keys))
    return lines


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


def figure_keys(summary: dict[str, Any]) -> list[str]:
    """The summary's scalar figures, in the order they are printed and logged."""
    return [key for key in (*SUMMARY_KEYS, *MTIL_KEYS, *PERPLEXITY_KEYS) if key in summary]


def _table(rows: list[list[float]], labels: list[str], corner: str, cell: str = "7.3f"):
    width = int(cell.split(".")[0])
    header = f"{corner:>9} | " + " ".join(f"{f'exp{j}':<{width}}" for j in range(len(rows[0])))
    lines = [header, "-" * len(header)]
    lines += [
        f"{label:>9} | " + " ".join(f"{a:{cell}}" for a in row)
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
    if "perplexity_matrix" in summary:  # lower is better; see mneme.app.core.metrics
        matrix = summary["perplexity_matrix"]
        lines.append("Perplexity matrix (row: after training experience k; column: test "
                     "experience j; lower is better)")  # fmt: skip
        lines += _table(matrix, [str(k) for k in range(len(matrix))], "after exp", "9.2f")
        lines.append(_figures(summary, PERPLEXITY_KEYS))
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
    """What tells one run from another. Short names first (capitalized: they sort first, and
    the HParams tab shows its first five columns, each cut at about 15 characters):
    ``Callbacks`` (class names, ``"Replay"``, ``"none"``), ``Data`` (the benchmark's name),
    ``Model`` (the encoder's name, else the class), ``Optimizer`` (class and learning rate)
    and ``Seed`` (as text: a label, which the tab would print as ``0.0000``); then nested,
    the long forms: ``described/<Name>``, the
    one-line call with every argument that differs from its default
    (``"Replay(buffer_size=200, policy='class_balanced')"``), and every argument (loggers
    flatten them with ``/``): ``model`` (class and hyperparameters), ``optimizer`` (class
    and arguments), ``callbacks`` (each callback's ``__init__`` arguments, by class) and
    ``data`` (the datamodule's hyperparameters). The trainer's bookkeeping callbacks
    (progress bar and lines, checkpoints, summaries, the cost meter, this one) are left
    out."""
    overview: dict[str, Any] = {}
    described: dict[str, str] = {}
    config: dict[str, Any] = {}
    callbacks: dict[str, Any] = {}
    calls, names = [], []
    from_cli = cli_callback_arguments(trainer)  # LightningCLI's parsed config, when it ran
    for callback in trainer.callbacks:
        if not affects_training(callback):  # a dashboard or bookkeeping: not the run
            continue
        name = type(callback).__name__
        key = name if name not in callbacks else f"{name}_{len(callbacks)}"
        parsed = from_cli(callback)
        callbacks[key] = _plain(parsed) if parsed is not None else _init_arguments(callback)
        calls.append(_call(name, _changed(type(callback), callbacks[key])))
        names.append(name)
    overview["Callbacks"] = ", ".join(names) or "none"
    described["Callbacks"] = ", ".join(calls) or "none"
    config["callbacks"] = callbacks
    if trainer.datamodule is not None:
        data = config["data"] = _module_config(trainer.datamodule)
        described["Data"] = _call(
            type(trainer.datamodule).__name__, _changed(type(trainer.datamodule), data)
        )
        benchmark = data.get("benchmark")
        overview["Data"] = (
            str(benchmark).rsplit(".", 1)[-1] if benchmark else type(trainer.datamodule).__name__
        )
    config["model"] = _module_config(pl_module)
    described["Model"] = _call(type(pl_module).__name__, _changed(type(pl_module), config["model"]))
    overview["Model"] = _short_model(type(pl_module).__name__, config["model"])
    for i, optimizer in enumerate(trainer.optimizers):
        key = "optimizer" if i == 0 else f"optimizer{i}"
        config[key] = _optimizer_config(optimizer)
        described[key.capitalize()] = _call(
            type(optimizer).__name__, _changed(type(optimizer), config[key])
        )
        lr = {"lr": config[key]["lr"]} if "lr" in config[key] else {}
        overview[key.capitalize()] = _call(type(optimizer).__name__, lr)
    if "PL_GLOBAL_SEED" in os.environ:  # what seed_everything set
        overview["Seed"] = str(int(os.environ["PL_GLOBAL_SEED"]))
    return {**overview, "described": described, **config}


def _short_model(name: str, config: dict[str, Any]) -> str:
    """What the HParams tab shows whole (about 15 characters): the encoder's name
    (``mneme_mlp``, a timm name), else the module's class."""
    encoder = config.get("encoder")
    return encoder if isinstance(encoder, str) and encoder else name


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


@rank_zero_only
def _add_table(logger: TensorBoardLogger, table: str, step: int) -> None:
    """The printed table in the Text tab (monospace: a Markdown code block): exact values,
    which no smoothing touches."""
    logger.experiment.add_text("continual/table", "    " + table.replace("\n", "\n    "), step)


# The Custom Scalars tab: every test experience's accuracy in one chart (a value no
# neighbour's outlier scaling can hide), and the summary figures in another.
LAYOUT = {
    "continual": {
        "accuracy on each test experience (after experience k)": [
            "Multiline",
            [r"continual/acc_exp\d+$"],
        ],
        "summary": [
            "Multiline",
            [f"continual/{key}$" for key in ("average_accuracy", "forgetting", "bwt", "fwt")],
        ],
    }
}


@rank_zero_only
def _add_layout(logger: TensorBoardLogger) -> None:
    logger.experiment.add_custom_scalars(LAYOUT)


@rank_zero_only
def _add_heatmap(
    logger: TensorBoardLogger, rows: list[list[float]], step: int, name: str = "accuracy"
) -> None:
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
    # Perplexity has no fixed range: its colors span the matrix's own values, reversed so
    # that bright is good for both metrics.
    low, high = (0.0, 1.0) if name == "accuracy" else (np.nanmin(grid), np.nanmax(grid))
    high = high if high > low else low + 1.0
    if name != "accuracy":
        cmap = cmap.reversed()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=low, vmax=high, cmap=cmap)
    ax.set_facecolor("#eeeeee")  # rows not trained yet
    for k, row in enumerate(rows):
        for j, a in enumerate(row):
            if math.isnan(a):
                continue
            red, green, blue, _ = cmap((a - low) / (high - low))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            label = f"{a:.2f}" if a < 1000 else f"{a:.0f}"
            ax.text(j, k, label, ha="center", va="center", fontsize=fontsize,
                    fontweight="bold", color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(columns))
    ax.set_yticks(range(columns))
    ax.tick_params(labelsize=labelsize)
    ax.set_xlabel("test experience j", fontsize=labelsize)
    ax.set_ylabel("after experience k", fontsize=labelsize)
    ax.set_title(f"{name}, after experience {step}", fontsize=labelsize)
    ticks = [0, 0.5, 1] if name == "accuracy" else None
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, ticks=ticks)
    bar.ax.tick_params(labelsize=labelsize)
    fig.tight_layout(pad=0.3)
    logger.experiment.add_figure(f"continual/{name}_matrix", fig, global_step=step)
    plt.close(fig)
