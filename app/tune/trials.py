"""One trial of ``mneme tune``: the parsed configuration with the sampled values set on it,
one ``fit`` of it in its own run folder, its objective and its HParams row."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError
from mneme.app.tune.config_keys import set_key
from mneme.app.tune.pruning import ExperiencePruning
from mneme.app.tune.search_file import Objective, Param

# ``fit(config, extra_callbacks)``: one ``mneme fit`` of a parsed configuration (the CLI's,
# :mod:`mneme.app.cli.tune_command`); raises TrialFailed for a failure of that trial only.
Fit = Callable[[Any, list[Any]], None]
LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


class TrialFailed(Exception):
    """A trial that ended in an error of its own (bad sampled value, non-finite loss, ...):
    recorded as FAIL, and the search goes on."""


def trial_config(base: Any, params: list[Param], trial: Any, study_dir: Path):
    """The trial's configuration (``base``, the parser's Namespace of ``fit``, with the
    sampled values set and its own run folder), the shown values and the run folder."""
    from jsonargparse import Namespace

    config, shown = copy.deepcopy(base), {}
    section = config["fit"]
    for param in params:
        value, shown[param.key] = param.suggest(trial)
        set_key(section, param.key, value)
    version = f"trial_{trial.number:04d}"
    logger = section["trainer"].get("logger")
    args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if not (isinstance(args, Namespace) and "save_dir" in args):
        logger = Namespace(class_path=LOGGER, init_args=Namespace())
    logger.init_args.save_dir, logger.init_args.name = str(study_dir), "trials"
    logger.init_args.version = version
    section["trainer"]["logger"] = logger
    section["ckpt_path"] = None
    if isinstance(section.get("checkpoint"), Namespace):
        section["checkpoint"]["dirpath"] = None  # each trial's checkpoints in its run folder
    return config, shown, study_dir / "trials" / version


def run_trial(config: Any, run_dir: Path, pruning: Any, fit: Fit) -> dict[str, Any]:
    """One ``fit`` of ``config``; its ``continual_metrics.json``."""
    fit(config, [pruning] if pruning else [])
    metrics = run_dir / "continual_metrics.json"
    if not metrics.is_file():
        raise TrialFailed(f"the run wrote no {metrics} (is the metrics callback off?)")
    return json.loads(metrics.read_text())


def log_trial(study_dir: Path, number: int, shown: dict[str, Any], state: str, metrics: dict):
    """The trial as one row of TensorBoard's HParams tab (``<study_dir>/hparams``)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(
        save_dir=str(study_dir), name="hparams", version=f"trial_{number:04d}",
        default_hp_metric=False,
    )  # fmt: skip
    params = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in shown.items()}
    logger.log_hyperparams({**params, "trial": number, "state": state}, metrics=metrics)
    logger.finalize("success")


def make_objective(base: Any, params: list[Param], objective: Objective, study_dir: Path, fit: Fit):
    """Optuna's objective: one trial's run, its value(s) from its metrics."""
    import optuna

    def run(trial: optuna.Trial) -> float | list[float]:
        try:
            config, shown, run_dir = trial_config(base, params, trial, study_dir)
        except ConfigError as error:  # a sampled value replaced the subtree of a later key
            raise TrialFailed(str(error)) from None
        trial.set_user_attr("run_dir", str(run_dir))
        single = len(objective.terms) == 1
        pruning = ExperiencePruning(trial, objective) if single else None
        try:
            metrics = run_trial(config, run_dir, pruning, fit)
        except TrialFailed as error:
            trial.set_user_attr("error", str(error))
            raise
        if pruning is not None and pruning.pruned_at is not None:
            k, value = pruning.pruned_at, pruning.reported[pruning.pruned_at]
            log_trial(study_dir, trial.number, shown, "PRUNED",
                      {"tune/objective": value, "tune/pruned_at_experience": k})  # fmt: skip
            raise optuna.TrialPruned(
                f"At experience {k}: {objective.names[0]} {value:.4f} (run: {run_dir})"
            )
        found = objective.evaluate(metrics, f"{run_dir}/continual_metrics.json")
        values = [v for v in found if v is not None and math.isfinite(v)]
        if len(values) != len(found):
            raise TrialFailed(f"objective {objective.names} is null or not finite: {found}")
        scalars = {f"tune/{n}": v for n, v in zip(objective.names, values, strict=True)}
        if single:
            scalars["tune/objective"] = values[0]
        log_trial(study_dir, trial.number, shown, "COMPLETE", scalars)
        return values[0] if single else values

    return run
