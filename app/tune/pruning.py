"""Optuna's pruning at experience boundaries: a trial's running objective reported at
each experience end, the run stopped there when the pruner says so."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.tune.search_file import Objective
from mneme.callbacks.base import ExperienceCallback
from mneme.callbacks.reporting.continual_metrics import ContinualMetrics, cost_callback


class ExperiencePruning(ExperienceCallback):
    """Reports the trial's running objective to Optuna at each experience end
    (``trial.report(value, step=experience)``) and stops the run at that boundary when
    the pruner says so (``trainer.should_stop``: the boundary checkpoint and the
    metrics JSON are still written; ``mneme tune`` then records the trial PRUNED).

    Why not optuna-integration's ``PyTorchLightningPruningCallback``: it reports
    ``trainer.callback_metrics[monitor]`` at every validation end with the *epoch* as
    step and raises inside ``on_validation_end``, before the experience-end work and
    the boundary checkpoint; Mneme's running figures are computed by
    ``ContinualMetrics`` from the accuracy matrix (not logged with ``self.log``), and
    the step that compares trials is the experience.

    Needs a ``ContinualMetrics`` among the trainer's callbacks (the CLI adds one),
    checked in ``setup``. ``mneme tune`` adds it to every single-objective trial; it is
    not meant for a YAML config (it needs a live Optuna trial)::

        trainer = Trainer(callbacks=[ContinualMetrics(), ExperiencePruning(trial, objective)])
    """

    affects_training = False  # stopping early is not a strategy: the run stays the same
    STATE_VERSION = 1

    def __init__(self, trial: Any, objective: Objective) -> None:
        # private names: the run's HParams config lists no live trial object
        self._trial, self._objective = trial, objective
        self._metrics: ContinualMetrics | None = None
        self.reported: dict[int, float] = {}
        self.pruned_at: int | None = None

    @property
    def state_key(self) -> str:
        return "ExperiencePruning"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        callbacks = getattr(trainer, "callbacks", [])  # a property Lightning types loosely
        found = [c for c in callbacks if isinstance(c, ContinualMetrics)]
        if not found:
            raise ConfigError(
                "metrics: mneme tune reads the objective from the ContinualMetrics "
                "callback, which this run lacks; keep the CLI's `metrics:` callback on"
            )
        self._metrics = found[0]

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        k = experience
        if self._metrics is None or not self._metrics.rows:
            return
        cost = cost_callback(trainer)
        payload = dict(self._metrics.summary())
        if cost is not None:
            payload["cost"] = [dict(row) for row in cost.rows]
        (value,) = self._objective.evaluate(payload, "the metrics at experience end")
        if value is None or not math.isfinite(value):
            return  # not defined yet at this experience (fwt before experience 1)
        self._trial.report(value, step=k)
        self.reported[k] = value
        if self._trial.should_prune():
            self.pruned_at = k
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.STATE_VERSION, "reported": dict(self.reported),
                "pruned_at": self.pruned_at}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reported = {int(k): float(v) for k, v in state_dict["reported"].items()}
        self.pruned_at = state_dict.get("pruned_at")
