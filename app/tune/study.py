"""The Optuna study of ``mneme tune``: its sampler and pruner from the search file, its
SQLite file (checked before Optuna opens it), and the report of its best trials."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import warnings
from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError
from mneme.app.tune.search_file import Objective

STUDY_NAME = "mneme"
STUDY_FILE = "study.db"
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
# Optuna's heartbeat: a RUNNING trial silent for GRACE_S (its process was killed) is marked
# failed and retried once with the same values, by whichever process starts a trial next.
HEARTBEAT_S, GRACE_S = 10, 60


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


def check_study_dir(study_dir: Path) -> None:
    """Refuse, in one line, a ``--study_dir`` that is a file and a ``study.db`` that is a
    folder or not an SQLite database (corrupt, truncated): Optuna would end in a
    traceback, or start a new study over an earlier one's file."""
    for parent in (study_dir, *study_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"--study_dir: '{parent}' is a file, not a folder; pass a folder for the "
                    "study (it is created if missing)"
                )
            break
    db = study_dir / STUDY_FILE
    if not db.exists() and not db.is_symlink():
        return
    if not db.is_file():
        raise ConfigError(
            f"--study_dir: '{db}' is not a file (a folder?); pass another --study_dir, or "
            "move it away"
        )
    problem = _sqlite_problem(db)
    if problem is not None:
        raise ConfigError(
            f"--study_dir: '{db}' is not a readable Optuna study ({problem}); it is kept as "
            "it is: pass another --study_dir, or move the file away to start a new study"
        )


def _sqlite_problem(db: Path) -> str | None:
    """What is wrong with the SQLite file ``db`` (read only), or None. An empty file would
    become a new study; a non-empty one must pass SQLite's own integrity check."""
    if db.stat().st_size == 0:
        return "an empty file, not a study: truncated?"
    connection = None
    try:
        connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        (result,) = connection.execute("PRAGMA quick_check").fetchone()
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as error:
        return f"sqlite: {error}"
    finally:
        if connection is not None:
            connection.close()
    if result != "ok":
        return f"sqlite: {result}"
    if "studies" not in tables:
        return "an SQLite file without Optuna's tables"
    return None


def open_study(study_dir: Path, objective: Objective, sampler, pruner, attrs: dict[str, str]):
    """The study in ``<study_dir>/study.db``, created or loaded; one made for another
    config or search is refused."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    check_study_dir(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats and their retry are "experimental" in 5.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            f"sqlite:///{study_dir.resolve() / STUDY_FILE}",
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            # several processes write to one file: wait for SQLite's lock instead of failing
            engine_kwargs={"connect_args": {"timeout": 60}},
        )
    from optuna.study import StudyDirection

    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, load_if_exists=True, sampler=sampler,
        pruner=pruner, directions=[StudyDirection[d.upper()] for d in objective.directions],
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


class FailureLimit:
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
