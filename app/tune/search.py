"""``mneme tune``: hyperparameter search over any config with Optuna.

    mneme tune --config configs/tune_ewc_lambda.yaml \\
        --search configs/tune_ewc_lambda.search.yaml --trials 20 [--study_dir DIR] \\
        [--data.epochs_per_experience 1 ...]        # any `mneme fit` override

The config is parsed once by the CLI's own parser (a jsonargparse ``Namespace``, every
default filled in; :mod:`mneme.app.cli.tune_command` is the command line). Each trial is one
``mneme fit`` run in this process, through the same LightningCLI entry, on that parsed
config with the sampled values set: its own run folder
``<study_dir>/trials/trial_<n>/`` (checkpoints, TensorBoard events, ``config.yaml``,
``continual_metrics.json``). The objective is read from that ``continual_metrics.json``.

The search file::

    space:                                   # config keys, as `--print_config` names them
      trainer.callbacks.EWC.ewc_lambda: {type: float, low: 1.0, high: 1.0e5, log: true}
      model.optimizer.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}
      data.batch_size: {type: int, low: 16, high: 128, step: 16}
      trainer.callbacks[0]:                  # a categorical strategy choice: name -> value
        type: categorical
        choices:
          ewc: {class_path: mneme.callbacks.EWC, init_args: {ewc_lambda: 1000.0}}
          replay: {class_path: mneme.callbacks.Replay, init_args: {buffer_size: 200}}
    objective: average_accuracy              # any key of continual_metrics.json (default)
    # objective: {key: forgetting, direction: minimize}
    # objective: {weights: {average_accuracy: 1.0, forgetting: -0.5}}
    # objective: [average_accuracy, {key: cost.trainable_params, direction: minimize}]
    sampler: {type: tpe, seed: 0}            # tpe (default), random, gp, nsgaii, qmc, cmaes
    pruner: {type: median, n_startup_trials: 4, n_warmup_steps: 1}   # or none, threshold, ...

Keys: a list entry is named by its index (``trainer.callbacks[0]``) or by its class name
(``trainer.callbacks.EWC``), and ``init_args`` may be left out (``model.optimizer.lr`` is
``model.init_args.optimizer.init_args.lr``). Cost keys: ``cost.<field>`` is the last
experience's row of the cost report, ``cost.sum.<field>`` the sum over experiences
(``cost.sum.train_seconds``).

The study lives in ``<study_dir>/study.db`` (SQLite; default study_dir
``<logger save_dir>/<logger name>/tune``): the same command again continues to ``--trials``
finished (complete or pruned) trials, and several ``mneme tune`` processes on the same
arguments share the study (parallel trials). A killed process's running trial is found by
Optuna's heartbeat (``HEARTBEAT_S``) and retried with the same values. Each finished trial is
logged to ``<study_dir>/hparams/trial_<n>`` (TensorBoard's HParams tab: the sampled values and
``tune/objective``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError
from mneme.app.tune.config_keys import resolve_key, set_key
from mneme.app.tune.pruning import ExperiencePruning
from mneme.app.tune.search_file import (
    SEARCH_FIELDS,
    Objective,
    ObjectiveKeyError,
    Param,
    load_search,
    metric_value,
    parse_objective,
    parse_space,
)
from mneme.app.tune.study import (
    STUDY_NAME,
    FailureLimit,
    build_sampler_and_pruner,
    digest,
    finished,
    open_study,
    report,
)
from mneme.app.tune.trials import Fit, TrialFailed, make_objective

__all__ = [
    "STUDY_NAME",
    "ExperiencePruning",
    "Objective",
    "ObjectiveKeyError",
    "Param",
    "TrialFailed",
    "check_trials",
    "config_digest",
    "default_study_dir",
    "load_search",
    "metric_value",
    "parse_objective",
    "parse_space",
    "resolve_key",
    "search",
    "set_key",
]


def check_trials(trials: Any) -> int:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials: got {trials}; pass how many finished trials to reach (>= 1)")
    return trials


def default_study_dir(config: Any) -> Path:
    """``<logger save_dir>/<logger name>/tune`` of the parsed ``fit`` section."""
    logger = config["trainer"].get("logger")
    args = _plain(logger).get("init_args") or {} if logger else {}
    args = args if isinstance(args, dict) else {}
    return Path(args.get("save_dir") or "logs") / (args.get("name") or "mneme") / "tune"


def config_digest(config: Any) -> str:
    """What a study is made for: the parsed ``fit`` section without its logger (each trial
    gets its own) and without the names of the config files it was read from."""
    hashed = {k: v for k, v in _plain(config).items() if k not in ("config", "__path__")}
    hashed["trainer"] = {k: v for k, v in hashed["trainer"].items() if k != "logger"}
    return digest(hashed)


def _plain(node: Any) -> Any:
    from jsonargparse import Namespace

    return node.clone().as_dict() if isinstance(node, Namespace) else node


def search(
    config: Any,
    search_path: str,
    trials: int,
    study_dir: str | None,
    fit: Fit,
    config_text: str,
    spec: dict[str, Any] | None = None,
):
    """Run (or continue) the search of ``search_path`` over ``config`` (the CLI parser's
    Namespace, ``{subcommand: fit, fit: ...}``) to ``trials`` finished trials, each run by
    ``fit``; ``config_text`` is the command line it came from (kept with the study).
    ``spec``: the search file, already loaded. Returns the study."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    trials = check_trials(trials)
    spec = spec if spec is not None else load_search(search_path)
    objective = parse_objective(spec.get("objective"))
    parse_space(spec["space"], None)  # the search file's own mistakes, before the config's
    sampler, pruner = build_sampler_and_pruner(spec, multi=len(objective.terms) > 1)
    params = parse_space(spec["space"], config["fit"])
    folder = Path(study_dir) if study_dir else default_study_dir(config["fit"])
    attrs = {
        "config": config_text,
        "config_sha256": config_digest(config["fit"]),
        "search": str(search_path),
        "search_sha256": digest({k: spec.get(k) for k in SEARCH_FIELDS}),
    }
    study = open_study(folder, objective, sampler, pruner, attrs)
    if study.trials:
        # A seeded sampler would propose the values of this study's first trials again (a
        # resume, or another process): `sampler.seed` makes one uninterrupted search
        # reproducible, and a process that joins a study draws from fresh entropy.
        study.sampler.reseed_rng()
    done = finished(study)
    if done < trials:
        print(f"mneme tune: {done} of {trials} trials finished; study {folder / 'study.db'}")
        study.optimize(
            make_objective(config, params, objective, folder, fit),
            callbacks=[
                MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                FailureLimit(trials),
            ],
            catch=(TrialFailed,),
            gc_after_trial=True,
        )
    report(study, objective, folder)
    if finished(study) < trials:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        last = failed[-1].user_attrs.get("error", "see the log") if failed else "unknown"
        raise ConfigError(
            f"--trials: {len(failed)} trials failed before {trials} finished (last: {last}); "
            "fix the config or the search space"
        )
    return study
