"""``mneme tune``: hyperparameter search over any config with Optuna.

    mneme tune --config configs/tune_ewc_lambda.yaml \\
        --search configs/tune_ewc_lambda.search.yaml --trials 20 [--study_dir DIR] \\
        [--data.epochs_per_experience 1 ...]        # any `mneme fit` override

Each trial is one ``mneme fit`` run in this process, through the same LightningCLI entry
(``mneme.app.cli.parser.build_cli``), on the config with the sampled values set: its own run folder
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

import argparse
import contextlib
import copy
import difflib
import hashlib
import io
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError, MnemeError
from mneme.callbacks.base import ExperienceCallback
from mneme.callbacks.reporting.continual_metrics import ContinualMetrics, cost_callback

USAGE = (
    "usage: mneme tune --config CONFIG.yaml --search SEARCH.yaml --trials N "
    "[--study_dir DIR] [fit overrides]"
)
STUDY_NAME = "mneme"
DISTRIBUTIONS = ("float", "int", "categorical")
SPEC_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
SEARCH_FIELDS = ("space", "objective", "sampler", "pruner")
SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "gp": "GPSampler",
    "nsgaii": "NSGAIISampler",
    "qmc": "QMCSampler",
    "cmaes": "CmaEsSampler",
}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
    "wilcoxon": "WilcoxonPruner",
    "none": "NopPruner",
}
# Experience 0 carries no penalty yet for most strategies, so its figures say little about
# a strategy's hyperparameters: the default pruner judges from experience 1 on.
DEFAULT_PRUNER = {"type": "median", "n_startup_trials": 4, "n_warmup_steps": 1}
# Lower is better for these objectives unless the search file says otherwise.
MINIMIZED = ("forgetting",)
# Optuna's heartbeat: a RUNNING trial silent for GRACE_S (its process was killed) is marked
# failed and retried once with the same values, by whichever process starts a trial next.
HEARTBEAT_S, GRACE_S = 10, 60


class TrialFailed(Exception):
    """A trial that ended in an error of its own (bad sampled value, non-finite loss, ...):
    recorded as FAIL, and the search goes on."""


class ObjectiveKeyError(ConfigError):
    """The objective names a key the metrics do not have: every trial would fail alike."""


# -- the search file --------------------------------------------------------------------
@dataclass
class Param:
    """One searched config key and its distribution."""

    key: str
    spec: dict[str, Any]
    labels: dict[str, Any] = field(default_factory=dict)  # categorical label -> value

    def suggest(self, trial: Any) -> tuple[Any, Any]:
        """(value set in the config, value shown in Optuna and TensorBoard)."""
        kind, spec = self.spec["type"], self.spec
        if kind == "float":
            value = trial.suggest_float(
                self.key, spec["low"], spec["high"], log=spec.get("log", False),
                step=spec.get("step"),
            )  # fmt: skip
            return value, value
        if kind == "int":
            value = trial.suggest_int(
                self.key, spec["low"], spec["high"], log=spec.get("log", False),
                step=spec.get("step", 1),
            )  # fmt: skip
            return value, value
        label = trial.suggest_categorical(self.key, list(self.labels))
        return copy.deepcopy(self.labels[label]), label


@dataclass
class Objective:
    """One or more objectives, each a weighted sum of metric keys, with its direction."""

    terms: list[dict[str, float]]
    directions: list[str]

    @property
    def names(self) -> list[str]:
        return [" + ".join(k if w == 1 else f"{w:g}*{k}" for k, w in t.items()) for t in self.terms]

    def evaluate(self, metrics: dict[str, Any], where: str) -> list[float | None]:
        """The objective values of a metrics payload (``None`` where a key is null)."""
        values = []
        for term in self.terms:
            parts = [metric_value(metrics, key, where) for key in term]
            ok = all(p is not None for p in parts)
            values.append(
                sum(w * p for w, p in zip(term.values(), parts, strict=True)) if ok else None
            )
        return values


def load_search(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--search: no file at '{path}'; pass the YAML of the search space")
    try:
        search = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"--search {path}: invalid YAML ({reason})") from None
    if not isinstance(search, dict) or not isinstance(search.get("space"), dict):
        raise ConfigError(
            f"--search {path}: needs a mapping `space:` of config keys to distributions, e.g. "
            "`space: {model.optimizer.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}}`"
        )
    for key in search:
        if key not in SEARCH_FIELDS:
            raise ConfigError(f"--search: unknown field '{key}'{_close(key, SEARCH_FIELDS)}")
    if not search["space"]:
        raise ConfigError("space: is empty; name at least one config key to search over")
    return search


def parse_space(space: dict[str, Any], config: dict[str, Any] | None) -> list[Param]:
    """The searched keys, each checked against the full config (unless ``None``) and its
    distribution checked by Optuna's own distribution classes."""
    import optuna.distributions as od

    params = []
    for key, spec in space.items():
        where = f"space.{key}"
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(
                f"{where}: give a distribution, e.g. {{type: float, low: 0.001, high: 0.1, "
                "log: true}, {type: int, low: 1, high: 8} or {type: categorical, choices: [...]}"
            )
        kind = spec["type"]
        if kind not in DISTRIBUTIONS:
            raise ConfigError(
                f"{where}.type: unknown distribution type '{kind}'; use one of "
                f"{', '.join(DISTRIBUTIONS)}"
            )
        for name in spec:
            if name not in SPEC_FIELDS[kind]:
                raise ConfigError(
                    f"{where}.{name}: not a field of a {kind} distribution; use "
                    f"{', '.join(sorted(SPEC_FIELDS[kind] - {'type'}))}"
                )
        labels: dict[str, Any] = {}
        try:
            if kind == "categorical":
                labels = categorical_labels(spec.get("choices"), where)
                od.CategoricalDistribution(list(labels))
            else:
                if "low" not in spec or "high" not in spec:
                    raise ConfigError(f"{where}: a {kind} distribution needs `low` and `high`")
                cls = od.FloatDistribution if kind == "float" else od.IntDistribution
                step = spec.get("step", None if kind == "float" else 1)
                cls(spec["low"], spec["high"], log=bool(spec.get("log", False)), step=step)
        except (ValueError, TypeError) as error:  # Optuna's own check of low/high/log/step
            raise ConfigError(f"{where}: {error}") from None
        params.append(Param(str(key), dict(spec), labels))
    for param in params if config is not None else []:  # distributions need no config
        resolve_key(config, param.key)  # refuses a key the config does not have
    return params


def categorical_labels(choices: Any, where: str) -> dict[str, Any]:
    """Optuna's choices are scalars: a mapping names each value (a callback, a list of
    callbacks); a list of scalars is used as is; other list items get their JSON as name."""
    if isinstance(choices, dict) and choices:
        return {str(k): v for k, v in choices.items()}
    if isinstance(choices, list) and choices:
        scalar = (type(None), bool, int, float, str)
        return {c if isinstance(c, scalar) else json.dumps(c, sort_keys=True): c for c in choices}
    raise ConfigError(
        f"{where}.choices: give a non-empty list of values, or a mapping of names to values"
    )


def parse_objective(spec: Any) -> Objective:
    """``None`` (average accuracy), a key, ``{key, direction}``, ``{weights, direction}``,
    or a list of these (multi-objective)."""
    from mneme.callbacks.reporting.continual_metrics import MTIL_KEYS, SUMMARY_KEYS

    items = spec if isinstance(spec, list) else [spec if spec is not None else "average_accuracy"]
    terms, directions = [], []
    for item in items:
        item = {"key": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or ("key" in item) == ("weights" in item):
            raise ConfigError(
                "objective: give a key of continual_metrics.json (`average_accuracy`), "
                "{key: K, direction: minimize}, {weights: {K1: 1.0, K2: -0.5}}, or a list of them"
            )
        weights = item.get("weights") or {item.get("key"): 1.0}
        if not isinstance(weights, dict) or not all(
            isinstance(w, int | float) for w in weights.values()
        ):
            raise ConfigError("objective.weights: a mapping of metric keys to numbers")
        for key in weights:
            if not isinstance(key, str) or not (
                key.startswith("cost.") or key in (*SUMMARY_KEYS, *MTIL_KEYS)
            ):
                known = ", ".join((*SUMMARY_KEYS, *MTIL_KEYS, "cost.<field>", "cost.sum.<field>"))
                raise ObjectiveKeyError(
                    f"objective: continual_metrics.json has no key '{key}'"
                    f"{_close(str(key), (*SUMMARY_KEYS, *MTIL_KEYS))}; its keys: {known}"
                )
        first = next(iter(weights))
        default = "minimize" if first in MINIMIZED or first.startswith("cost.") else "maximize"
        direction = item.get("direction", default)
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"objective.direction: '{direction}'; use maximize or minimize")
        terms.append({k: float(w) for k, w in weights.items()})
        directions.append(direction)
    return Objective(terms, directions)


def metric_value(metrics: dict[str, Any], key: str, where: str) -> float | None:
    """A number of a ``continual_metrics.json`` payload; ``cost.<field>``: the last
    experience's cost row, ``cost.sum.<field>``: the sum over experiences."""
    if key.startswith("cost."):
        rows = metrics.get("cost") or []
        name = key.removeprefix("cost.sum.") if key.startswith("cost.sum.") else key[5:]
        if rows and name in rows[-1] and _number(rows[-1][name]):
            values = [r.get(name) or 0 for r in rows]
            return float(sum(values)) if key.startswith("cost.sum.") else float(values[-1])
        if not rows and "cost" in metrics:
            return None  # no experience measured yet
    elif key in metrics and (metrics[key] is None or _number(metrics[key])):
        return None if metrics[key] is None else float(metrics[key])
    numbers = [k for k, v in metrics.items() if _number(v) or (v is None and k != "stopped_by")]
    fields = [k for k, v in (metrics.get("cost") or [{}])[-1].items() if _number(v)]
    known = numbers + [f"cost.{f}" for f in fields] + [f"cost.sum.{f}" for f in fields]
    raise ObjectiveKeyError(
        f"objective: {where} has no number '{key}'{_close(key, known)}; its keys: "
        f"{', '.join(known)}"
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- config keys ------------------------------------------------------------------------
def split_key(key: str) -> list[str | int]:
    """``trainer.callbacks[0].init_args.x`` -> ``['trainer', 'callbacks', 0, 'init_args', 'x']``."""
    parts: list[str | int] = []
    for piece in key.split("."):
        match = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", piece)
        if not match or (not match.group(1) and not match.group(2)):
            raise ConfigError(f"space.{key}: not a config key (write a.b.c, or a.b[0].c)")
        if match.group(1):
            parts.append(match.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return parts


def class_name(item: Any) -> str | None:
    path = item.get("class_path") if isinstance(item, dict) else None
    return path.rsplit(".", 1)[-1] if isinstance(path, str) else None


def resolve_key(config: dict[str, Any], key: str) -> list[str | int]:
    """The full path of ``key`` in ``config`` (``init_args`` filled in, a list entry's
    class name turned into its index); a key the config lacks is refused with the
    closest key it has."""
    path: list[str | int] = []
    node: Any = config
    for part in split_key(key):
        if isinstance(node, dict) and isinstance(part, str):
            if part in node:
                path.append(part)
            elif isinstance(node.get("init_args"), dict) and part in node["init_args"]:
                path.append("init_args")
                node = node["init_args"]
                path.append(part)
            else:
                _unknown_key(config, key)
        elif isinstance(node, list):
            if isinstance(part, int):
                if part >= len(node):
                    _unknown_key(config, key)
                path.append(part)
            else:
                found = [i for i, item in enumerate(node) if class_name(item) == part]
                if len(found) > 1:
                    raise ConfigError(
                        f"space.{key}: the list holds {len(found)} {part}s; name one by index "
                        f"({'.'.join(map(str, path))}[{found[0]}])"
                    )
                if not found:
                    _unknown_key(config, key)
                path.append(found[0])
        else:
            _unknown_key(config, key)
        node = node[path[-1]]
    return path


def config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of the config, as ``resolve_key`` takes them (list entries by class name
    where unique), each also without its ``init_args`` parts."""
    keys = []
    if isinstance(node, dict):
        items = [(str(k), v) for k, v in node.items()]
    elif isinstance(node, list):
        names = [class_name(item) for item in node]
        items = [
            (n if n and names.count(n) == 1 else f"[{i}]", v)
            for i, (n, v) in enumerate(zip(names, node, strict=True))
        ]
    else:
        return keys
    for name, value in items:
        key = f"{prefix}{name}" if name.startswith("[") or not prefix else f"{prefix}.{name}"
        keys.append(key)
        keys += config_keys(value, key)
    return keys


def _unknown_key(config: dict[str, Any], key: str) -> None:
    keys = config_keys(config)
    keys += [k.replace(".init_args", "") for k in keys]
    raise ConfigError(
        f"space.{key}: the config has no such key{_close(key, keys, cutoff=0.5)} "
        "(`mneme fit --config X --print_config` lists them)"
    )


def _close(word: str, candidates, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    path = resolve_key(config, key)
    node = config
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


# -- the config, the study --------------------------------------------------------------
def full_config(config_args: list[str]) -> dict[str, Any]:
    """The run's whole configuration as ``mneme fit ... --print_config`` prints it: the
    CLI's own parsing, defaults filled in, so every key a trial may set is there."""
    from mneme.app.cli.parser import build_cli

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            build_cli(["fit", *config_args, "--print_config"])
    except SystemExit as done:  # jsonargparse exits after printing
        if done.code not in (0, None):
            raise ConfigError(f"--config: the config does not parse ({done.code})") from None
    config = yaml.safe_load(printed.getvalue())
    if not isinstance(config, dict) or "trainer" not in config:
        raise ConfigError("--config: `mneme fit --print_config` printed no configuration")
    return config


def default_study_dir(config: dict[str, Any]) -> Path:
    logger = config["trainer"].get("logger")
    args = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    return Path(args.get("save_dir") or "logs") / (args.get("name") or "mneme") / "tune"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def build_sampler_and_pruner(search: dict[str, Any], multi: bool) -> tuple[Any, Any]:
    import optuna

    def make(kind: str, spec: Any, table: dict[str, str], module) -> Any:
        spec = {"type": spec} if isinstance(spec, str) else dict(spec)
        name = spec.pop("type", None)
        if name not in table:
            raise ConfigError(
                f"{kind}.type: unknown {kind} '{name}'; use one of {', '.join(table)}"
            )
        try:
            return getattr(module, table[name])(**spec)
        except TypeError as error:
            raise ConfigError(
                f"{kind}: {error} (the arguments of optuna's {table[name]})"
            ) from None
        except (ValueError, ImportError) as error:
            raise ConfigError(f"{kind}: {error}") from None

    sampler = make("sampler", search.get("sampler") or {"type": "tpe"}, SAMPLERS, optuna.samplers)
    if multi and search.get("pruner") not in (None, "none", {"type": "none"}):
        raise ConfigError(
            "pruner: Optuna prunes single-objective studies only; drop `pruner` from the "
            "search file, or search one objective"
        )
    pruner_spec = search.get("pruner") or ({"type": "none"} if multi else DEFAULT_PRUNER)
    return sampler, make("pruner", pruner_spec, PRUNERS, optuna.pruners)


def open_study(study_dir: Path, objective: Objective, sampler, pruner, attrs: dict[str, str]):
    """The study in ``<study_dir>/study.db``, created or loaded; one made for another
    config or search is refused."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    study_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats and their retry are "experimental" in 5.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            f"sqlite:///{study_dir.resolve() / 'study.db'}",
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            # several processes write to one file: wait for SQLite's lock instead of failing
            engine_kwargs={"connect_args": {"timeout": 60}},
        )
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, load_if_exists=True, sampler=sampler,
        pruner=pruner, directions=objective.directions,
    )  # fmt: skip
    saved = study.user_attrs
    if not saved:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return study
    for key, option in (("config_sha256", "--config"), ("search_sha256", "--search")):
        if saved.get(key) != attrs[key]:
            what = saved.get("config") if key == "config_sha256" else saved.get("search")
            raise ConfigError(
                f"--study_dir {study_dir}: holds a study of another {option} ({what}, with its "
                f"overrides); pass a new --study_dir, or the {option} that study was made with"
            )
    return study


# -- pruning at experience boundaries -------------------------------------------------------
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
        found = [c for c in trainer.callbacks if isinstance(c, ContinualMetrics)]
        if not found:
            raise ConfigError(
                "metrics: mneme tune reads the objective from the ContinualMetrics "
                "callback, which this run lacks; keep the CLI's `metrics:` callback on"
            )
        self._metrics = found[0]

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, k: int):
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


# -- trials -----------------------------------------------------------------------------
def trial_config(base: dict[str, Any], params: list[Param], trial: Any, study_dir: Path):
    """The trial's config (sampled values set, its own run folder) and the shown values."""
    config, shown = copy.deepcopy(base), {}
    for param in params:
        value, shown[param.key] = param.suggest(trial)
        set_key(config, param.key, value)
    version = f"trial_{trial.number:04d}"
    logger = config["trainer"].get("logger")
    if not (isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {})):
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {}}
    logger["init_args"].update(save_dir=str(study_dir), name="trials", version=version)
    config["trainer"]["logger"] = logger
    config["ckpt_path"] = None
    if isinstance(config.get("checkpoint"), dict):
        config["checkpoint"]["dirpath"] = None  # each trial's checkpoints in its run folder
    return config, shown, study_dir / "trials" / version


def run_trial(config: dict[str, Any], run_dir: Path, pruning: Any) -> dict[str, Any]:
    """One ``mneme fit`` of ``config`` in this process; its ``continual_metrics.json``."""
    from mneme.app.cli.messages import summarize_library_error
    from mneme.app.cli.parser import RunInterrupted, build_cli
    from mneme.app.cli.run_folders import release_claims

    path = run_dir.parent.parent / "configs" / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        build_cli(["fit", "--config", str(path)], extra_callbacks=[pruning] if pruning else [])
    except (RunInterrupted, ObjectiveKeyError, KeyboardInterrupt):
        raise  # the search ends: a signal, or an objective no trial can meet
    except MnemeError as error:  # ConfigError of a sampled value, non-finite loss, ...
        raise TrialFailed(str(error)) from None
    except Exception as error:  # noqa: BLE001 - any failure of one trial is that trial's
        summary = summarize_library_error(error) or f"{type(error).__name__}: {error}"
        raise TrialFailed(" ".join(summary.split())[:400]) from None
    finally:
        release_claims()
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


def make_objective(base, params, objective: Objective, study_dir: Path):
    import optuna

    def run(trial: optuna.Trial):
        try:
            config, shown, run_dir = trial_config(base, params, trial, study_dir)
        except ConfigError as error:  # a sampled value replaced the subtree of a later key
            raise TrialFailed(str(error)) from None
        trial.set_user_attr("run_dir", str(run_dir))
        single = len(objective.terms) == 1
        pruning = ExperiencePruning(trial, objective) if single else None
        try:
            metrics = run_trial(config, run_dir, pruning)
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
        values = objective.evaluate(metrics, f"{run_dir}/continual_metrics.json")
        if any(v is None or not math.isfinite(v) for v in values):
            raise TrialFailed(f"objective {objective.names} is null or not finite: {values}")
        scalars = {f"tune/{n}": v for n, v in zip(objective.names, values, strict=True)}
        if single:
            scalars["tune/objective"] = values[0]
        log_trial(study_dir, trial.number, shown, "COMPLETE", scalars)
        return values[0] if single else values

    return run


class _FailureLimit:
    """Stops the search once ``limit`` trials failed (every trial failing would never
    reach the finished count)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, study, trial) -> None:
        from optuna.trial import TrialState

        if len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) >= self.limit:
            study.stop()


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def tune(config_args: list[str], search_path: str, trials: int, study_dir: str | None = None):
    """Run (or continue) the search to ``trials`` finished trials; returns the study."""
    import logging

    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.get_verbosity()  # makes optuna attach its stderr handler
    for handler in logging.getLogger("optuna").handlers:  # a filter on the handler sees
        if _one_line_failures not in handler.filters:  # the records of every optuna.* logger
            handler.addFilter(_one_line_failures)
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials: got {trials}; pass how many finished trials to reach (>= 1)")
    if not any(a == "--config" or a.startswith("--config=") for a in config_args):
        raise ConfigError("--config: `mneme tune` needs the config to search over")
    search = load_search(search_path)
    objective = parse_objective(search.get("objective"))
    parse_space(search["space"], None)  # the search file's own mistakes, before any parsing
    sampler, pruner = build_sampler_and_pruner(search, multi=len(objective.terms) > 1)
    base = full_config(config_args)
    params = parse_space(search["space"], base)
    folder = Path(study_dir) if study_dir else default_study_dir(base)
    hashed = {k: v for k, v in base.items() if k != "trainer"}
    hashed["trainer"] = {k: v for k, v in base["trainer"].items() if k != "logger"}
    attrs = {
        "config": " ".join(config_args),
        "config_sha256": digest(hashed),
        "search": str(search_path),
        "search_sha256": digest({k: search.get(k) for k in SEARCH_FIELDS}),
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
            make_objective(base, params, objective, folder),
            callbacks=[
                MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                _FailureLimit(trials),
            ],
            catch=(TrialFailed,),
            gc_after_trial=True,
        )
    report(study, objective, folder)
    if finished(study) < trials:
        failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        last = failed[-1].user_attrs.get("error", "see the log") if failed else "unknown"
        raise ConfigError(
            f"--trials: {len(failed)} trials failed before {trials} finished (last: {last}); "
            "fix the config or the search space"
        )
    return study


def report(study, objective: Objective, folder: Path) -> None:
    """Print the best trial(s) and write them to ``<study_dir>/best.json``."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    best = study.best_trials if complete else []
    if len(objective.terms) == 1 and complete:
        best = [study.best_trial]
    rows = [
        {
            "number": t.number,
            "values": t.values,
            "params": t.params,
            "run_dir": t.user_attrs["run_dir"],
        }
        for t in best
    ]
    summary = {
        "objective": objective.names, "directions": objective.directions,
        "complete": len(complete), "pruned": len(pruned), "failed": len(failed), "best": rows,
    }  # fmt: skip
    (folder / "best.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"mneme tune: {len(complete)} complete, {len(pruned)} pruned, {len(failed)} failed")
    for row in rows:
        print(f"  best trial {row['number']}: {objective.names} = {row['values']}  {row['params']}")
        print(f"    run: {row['run_dir']}")
    print(f"  TensorBoard HParams: tensorboard --logdir {folder / 'hparams'}")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The tune options; the rest (``--config``, fit overrides) goes to the CLI's parser."""
    parser = argparse.ArgumentParser(
        prog="mneme tune",
        usage=USAGE.removeprefix("usage: "),
        description="Hyperparameter search over any config key with Optuna.",
        epilog="the search file (--search):\n"
        + __doc__.split("The search file::", 1)[1].split("Keys:", 1)[0].rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--search", required=False, help="YAML of the search space")
    parser.add_argument("--trials", type=str, default=None, help="finished trials to reach")
    parser.add_argument("--study_dir", default=None, help="default <save_dir>/<name>/tune")
    options, rest = parser.parse_known_args(argv)
    if not options.search:
        raise ConfigError("--search: `mneme tune` needs the YAML of the search space")
    try:
        options.trials = int(options.trials)
    except (TypeError, ValueError):
        raise ConfigError(f"--trials: got {options.trials!r}; pass a number >= 1") from None
    return options, rest


def _one_line_failures(record) -> bool:
    """Optuna logs a failed trial with its traceback; a ``TrialFailed`` already says in
    one line what went wrong (``MNEME_DEBUG=1`` keeps the traceback)."""
    from mneme.app.cli.main import debug_mode

    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, TrialFailed) and not debug_mode():
        record.exc_info = None
    return True


def main(argv: list[str]) -> None:
    """``mneme tune ...``: one line on the user's errors."""
    from mneme.app.cli.main import debug_mode, rank_zero_error
    from mneme.app.cli.parser import RunInterrupted

    try:
        options, rest = parse_args(argv)
        tune(rest, options.search, options.trials, options.study_dir)
    except RunInterrupted as error:
        rank_zero_error(str(error))
        sys.exit(error.status)
    except ConfigError as error:
        if debug_mode():
            raise
        sys.exit(f"mneme: error: {error}")
