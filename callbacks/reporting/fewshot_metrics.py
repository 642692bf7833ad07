"""Few-shot results as the field reports them: mean accuracy over episodes with a 95%
confidence interval, per method and N-way K-shot setting.

The interval is ``1.96 * std / sqrt(episodes)``, with ``std`` the standard deviation of the
per-episode accuracies (numpy's ``np.std``, ``ddof=0``): the normal-approximation interval of
the mean that the few-shot literature prints as ``mean ± ci95`` (the evaluation code of
Chen et al. 2019, "A closer look at few-shot classification", MetaOptNet, FEAT, ...), over
600 or more test episodes.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from mneme.app.core.protocols import require
from mneme.callbacks.run_context import write_json
from mneme.datamodules.fewshot.meta_batches import eval_settings_of

Z95 = 1.96
CONFIDENCE = (
    "95% normal interval of the mean: 1.96 * std / sqrt(episodes), std over episodes (ddof=0)"
)
JSON_NAME = "fewshot_metrics.json"


class ReportsEpisodeAccuracies(Protocol):
    """A module whose ``validation_step``/``test_step`` add each episode's query accuracy to
    ``episode_accuracies`` (an ``nn.ModuleList`` of ``torchmetrics.CatMetric``, one per
    evaluation setting and method).

    Optional members: ``episode_settings`` (``[(n_way, k_shot), ...]``, default the
    datamodule's ``eval_settings``) and ``episode_methods`` (method names; metric
    ``m * len(settings) + s`` holds method ``m`` on setting ``s``; default one unnamed
    method)."""

    episode_accuracies: Any


def mean_ci95(accuracies: Any) -> tuple[float, float]:
    """The mean of per-episode accuracies and its 95% confidence half-width
    (``1.96 * np.std(a) / sqrt(len(a))``)."""
    a = torch.as_tensor(accuracies, dtype=torch.float64).flatten()
    if a.numel() == 0:
        return math.nan, math.nan
    std = a.std(correction=0) if a.numel() > 1 else a.new_zeros(())
    return float(a.mean()), float(Z95 * std / math.sqrt(a.numel()))


def setting_name(n_way: int, k_shot: int) -> str:
    return f"{n_way}way_{k_shot}shot"


class FewShotMetrics(Callback):
    """Reports a few-shot module's ``episode_accuracies`` at each validation and test epoch
    end: mean and 95% confidence interval per (method,) N-way K-shot setting.

    - logged (TensorBoard, through ``module.log_dict``): ``fewshot/<N>way_<K>shot_accuracy``
      and ``fewshot/<N>way_<K>shot_ci95`` at test, ``val_fewshot/...`` at validation; with
      several methods the names carry the method: ``fewshot/<method>_<N>way_<K>shot_...``;
    - written: ``<log_dir>/fewshot_metrics.json`` after a test (or ``mneme validate``),
      ``fewshot_val_metrics.json`` after each validation during ``fit``;
    - printed: a table, one row per method, one column per setting (``mean ± ci95`` in %),
      after a test or a ``validate`` (not at every validation of a fit).

    The per-episode accuracies are ``CatMetric`` states, gathered across processes by
    torchmetrics, so every rank reports the same figures over every episode.

    Args:
        print_table: print the table.
    """

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table
        self.last: dict[str, Any] | None = None  # the latest report (the JSON's content)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, ReportsEpisodeAccuracies, "FewShotMetrics")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        self._report(trainer, pl_module, "val", quiet=fitting)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test", quiet=False)

    # -- the report -----------------------------------------------------------------------
    def rows(self, trainer: Trainer, pl_module: LightningModule) -> list[dict[str, Any]]:
        """One row per (method, setting) with episodes: ``method``, ``n_way``, ``k_shot``,
        ``episodes``, ``mean``, ``ci95``. Collective under DDP: call it on every rank."""
        metrics = list(pl_module.episode_accuracies)
        methods = list(getattr(pl_module, "episode_methods", None) or [None])
        settings = getattr(pl_module, "episode_settings", None)
        if not settings:
            settings = eval_settings_of(trainer.datamodule)
        if len(methods) == 1:  # a module may grow metrics past its settings: report those named
            metrics = metrics[: len(settings)]
        if len(metrics) != len(methods) * len(settings):
            raise ValueError(
                f"FewShotMetrics: {len(metrics)} episode metrics for {len(methods)} methods "
                f"x {len(settings)} settings"
            )
        rows = []
        for index, metric in enumerate(metrics):
            if not metric.update_called:
                continue
            values = metric.compute()
            mean, ci95 = mean_ci95(values)
            method = methods[index // len(settings)]
            n_way, k_shot = settings[index % len(settings)]
            row = {"method": method, "n_way": int(n_way), "k_shot": int(k_shot)}
            rows.append({**row, "episodes": int(values.numel()), "mean": mean, "ci95": ci95})
        return rows

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str, quiet: bool):
        rows = self.rows(trainer, pl_module)
        if not rows:
            return
        prefix = "fewshot" if stage == "test" else "val_fewshot"
        named = any(r["method"] is not None for r in rows)
        scalars = {}
        for r in rows:
            name = setting_name(r["n_way"], r["k_shot"])
            name = f"{r['method']}_{name}" if named else name
            scalars[f"{prefix}/{name}_accuracy"] = r["mean"]
            scalars[f"{prefix}/{name}_ci95"] = r["ci95"]
        # Every rank holds the gathered figures already; sync_dist only tells Lightning so.
        pl_module.log_dict(scalars, sync_dist=True)
        settings = sorted({(r["n_way"], r["k_shot"]) for r in rows})
        self.last = {
            "stage": stage,
            "ckpt_path": trainer.ckpt_path or getattr(pl_module, "checkpoint", None),
            "confidence": CONFIDENCE,
            "settings": [list(s) for s in settings],
            "methods": list(dict.fromkeys(r["method"] for r in rows)) if named else None,
            "results": rows,
        }
        fitting = trainer.state.fn == "fit"
        name = "fewshot_val_metrics.json" if fitting else JSON_NAME
        write_json(trainer, name, self.last)
        table = format_fewshot(rows, stage)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                _add_table(logger, table, trainer.global_step)
        if self.print_table and not quiet:
            _print(table)


def format_fewshot(rows: list[dict[str, Any]], stage: str = "test") -> str:
    """The report as a text table: a row per method, a column per setting, ``mean ± ci95``
    in percent, and the number of episodes below."""
    settings = list(dict.fromkeys((r["n_way"], r["k_shot"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["method"], r["n_way"], r["k_shot"]): r for r in rows}
    width = max(12, *(len(str(m)) for m in methods))
    header = f"{'method':<{width}} | " + " ".join(f"{f'{n}-way {k}-shot':>15}" for n, k in settings)
    lines = [
        f"Few-shot {stage} accuracy (%): mean ± 95% CI over episodes",
        header,
        "-" * len(header),
    ]
    for method in methods:
        cells = []
        for n, k in settings:
            r = by_key.get((method, n, k))
            cell = "n/a" if r is None else f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}"
            cells.append(f"{cell:>15}")
        lines.append(f"{str(method or 'accuracy'):<{width}} | " + " ".join(cells))
    episodes = [max(r["episodes"] for r in rows if (r["n_way"], r["k_shot"]) == s)
                for s in settings]  # fmt: skip
    lines.append(f"{'episodes':<{width}} | " + " ".join(f"{e:>15d}" for e in episodes))
    return "\n".join(lines)


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


@rank_zero_only
def _add_table(logger: TensorBoardLogger, table: str, step: int) -> None:
    logger.experiment.add_text("fewshot/table", "    " + table.replace("\n", "\n    "), step)
