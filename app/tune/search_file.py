"""The search file of ``mneme tune``: the searched config keys and their distributions,
the objective, checked before anything runs (see :mod:`mneme.app.tune.search` for its
format)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mneme.app.core.errors import ConfigError
from mneme.app.tune.config_keys import close, resolve_key

DISTRIBUTIONS = ("float", "int", "categorical")
SPEC_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
SEARCH_FIELDS = ("space", "objective", "sampler", "pruner")
# Lower is better for these objectives unless the search file says otherwise.
MINIMIZED = ("forgetting",)
# Config keys no search may set: trust comes from outside every config and search file.
UNSEARCHABLE = {
    "data.trusted_benchmarks": (
        "trust is not a hyperparameter: no config or search file extends what may be "
        "imported; register your stream with @stream in code imported before the CLI runs, "
        "or list it in the MNEME_TRUSTED_BENCHMARKS environment variable"
    ),
}


class ObjectiveKeyError(ConfigError):
    """The objective names a key the metrics do not have: every trial would fail alike."""


@dataclass
class Param:
    """One searched config key and its distribution."""

    key: str
    spec: dict[str, Any]
    labels: dict[Any, Any] = field(default_factory=dict)  # categorical label -> value

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
            numbers = [p for p in parts if p is not None]
            ok = len(numbers) == len(parts)
            values.append(
                sum(w * p for w, p in zip(term.values(), numbers, strict=True)) if ok else None
            )
        return values


def load_search(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--search: no file at '{path}'; pass the YAML of the search space")
    try:
        search = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"--search {path}: invalid YAML ({reason[:200]})") from None
    if not isinstance(search, dict) or not isinstance(search.get("space"), dict):
        raise ConfigError(
            f"--search {path}: needs a mapping `space:` of config keys to distributions, e.g. "
            "`space: {model.optimizer.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}}`"
        )
    for key in search:
        if key not in SEARCH_FIELDS:
            raise ConfigError(f"--search: unknown field '{key}'{close(key, SEARCH_FIELDS)}")
    if not search["space"]:
        raise ConfigError("space: is empty; name at least one config key to search over")
    return search


def parse_space(space: dict[str, Any], config: Any = None) -> list[Param]:
    """The searched keys, each distribution checked by Optuna's own distribution classes,
    and each key checked against the parsed ``config`` (unless ``None``)."""
    params = []
    for key, spec in space.items():
        where = f"space.{key}"
        for unsearchable, why in UNSEARCHABLE.items():
            if str(key).replace(".init_args", "") == unsearchable or _names(spec, unsearchable):
                raise ConfigError(f"{where}: {unsearchable} cannot be searched; {why}")
        params.append(Param(str(key), dict(spec), _distribution(spec, where)))
    for param in params if config is not None else []:  # distributions need no config
        resolve_key(config, param.key)  # refuses a key the config does not have
    return params


def _distribution(spec: Any, where: str) -> dict[Any, Any]:
    """Check one distribution; returns a categorical's labels (else ``{}``)."""
    import optuna.distributions as od

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
    if kind == "categorical":
        labels = categorical_labels(spec.get("choices"), where)
        od.CategoricalDistribution(list(labels))
        return labels
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a {kind} distribution needs `low` and `high`")
    if kind == "int":  # Optuna would round a fractional bound without a word
        for name in ("low", "high", "step"):
            value = spec.get(name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
                raise ConfigError(
                    f"{where}.{name}: an int distribution takes whole numbers, got {value!r}; "
                    "give integer bounds, or use type: float"
                )
    cls = od.FloatDistribution if kind == "float" else od.IntDistribution
    step = spec.get("step", None if kind == "float" else 1)
    try:  # Optuna's own check of low/high/log/step
        cls(spec["low"], spec["high"], log=bool(spec.get("log", False)), step=step)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from None
    return {}


def _names(spec: Any, key: str) -> bool:
    """Whether a categorical choice sets ``key`` (``data.trusted_benchmarks``) inside the
    value it gives (a whole ``data`` section, say)."""
    last = key.rsplit(".", 1)[-1]

    def holds(node: Any) -> bool:
        if isinstance(node, dict):
            return last in node or any(holds(v) for v in node.values())
        if isinstance(node, list):
            return any(holds(v) for v in node)
        return False

    return isinstance(spec, dict) and holds(spec.get("choices"))


def categorical_labels(choices: Any, where: str) -> dict[Any, Any]:
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
    from mneme.callbacks.reporting.accuracy_tables import MTIL_KEYS, SUMMARY_KEYS

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
                    f"{close(str(key), (*SUMMARY_KEYS, *MTIL_KEYS))}; its keys: {known}"
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
        f"objective: {where} has no number '{key}'{close(key, known)}; its keys: {', '.join(known)}"
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
