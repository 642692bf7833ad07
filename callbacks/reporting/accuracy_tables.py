"""The accuracy matrix and its figures as printed text: the tables ``ContinualMetrics``
prints at the end of ``fit``, ``test`` and ``validate`` (and shows in TensorBoard's Text tab),
and the ``report_lines`` other callbacks print under them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

SUMMARY_KEYS = ("average_accuracy", "forgetting", "bwt", "fwt", "average_incremental_accuracy")
# MTIL figures (ZSCL), only for zero-shot models; zero_shot_transfer is their reference.
MTIL_KEYS = ("mtil_transfer", "mtil_average", "mtil_last", "zero_shot_transfer")
# Perplexity figures (lower is better), for modules with ``experience_perplexity`` (ContinualLM).
PERPLEXITY_KEYS = (
    "average_perplexity", "perplexity_forgetting", "perplexity_bwt", "general_perplexity_rise"
)  # fmt: skip


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


def format_matrix(title: str, rows: list[list[float]], labels: Sequence[Any] | None = None,
                  summary: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """Another accuracy matrix (int8, robust) as the printed one: ``title``, a row per
    experience (``labels``: the experiences the rows were measured after, default 0..),
    and the summary figures it has below."""
    if not rows:
        return []
    labels = [str(k) for k in (range(len(rows)) if labels is None else labels)]
    lines = [title, *format_table(rows, labels, "after exp")]
    summary = summary or {}
    keys = [k for k in ("average_accuracy", "forgetting", "bwt") if summary.get(k) is not None]
    if keys:
        lines.append(_figures(summary, keys))
    return lines


def figure_keys(summary: dict[str, Any]) -> list[str]:
    """The summary's scalar figures, in the order they are printed and logged."""
    return [key for key in (*SUMMARY_KEYS, *MTIL_KEYS, *PERPLEXITY_KEYS) if key in summary]


def format_table(rows: list[list[float]], labels: list[str], corner: str, cell: str = "7.3f"):
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
    lines += format_table(rows, labels, "after exp")
    lines.append(_figures(summary, ("average_accuracy", "forgetting", "bwt", "fwt")))
    lines.append(_figures(summary, ("average_incremental_accuracy",)))
    if mtil:
        lines.append("MTIL (ZSCL): " + _figures(summary, MTIL_KEYS))
    if "perplexity_matrix" in summary:  # lower is better; see mneme.app.core.metrics
        matrix = summary["perplexity_matrix"]
        lines.append("Perplexity matrix (row: after training experience k; column: test "
                     "experience j; lower is better)")  # fmt: skip
        lines += format_table(matrix, [str(k) for k in range(len(matrix))], "after exp", "9.2f")
        lines.append(_figures(summary, PERPLEXITY_KEYS))
    return "\n".join(lines)


def format_stage(stage: str, accuracy: list[float], average: float | None) -> str:
    """One evaluation (``mneme test``/``validate``) as the same table as ``fit``'s."""
    lines = [f"{stage.capitalize()} accuracy (column: test experience j)"]
    lines += format_table([accuracy], [stage], "")
    lines.append(_figures({"average_accuracy": average}, ("average_accuracy",)))
    return "\n".join(lines)


@rank_zero_only
def print_rank_zero(text: str) -> None:
    print(text, flush=True)
