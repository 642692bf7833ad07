"""``mneme tune``'s command line: its options, the config parsed once by the CLI's own
parser, and each trial's ``fit`` through the same LightningCLI entry; the search itself is
:mod:`mneme.app.tune.search` (its docstring describes the search file).

    mneme tune --config configs/tune_ewc_lambda.yaml \\
        --search configs/tune_ewc_lambda.search.yaml --trials 20 [--study_dir DIR] \\
        [--data.epochs_per_experience 1 ...]        # any `mneme fit` override
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mneme.app.cli.commands import RunInterrupted
from mneme.app.cli.parser import build_cli
from mneme.app.cli.raw_config import walk
from mneme.app.cli.run_folders import release_claims
from mneme.app.core.errors import ConfigError, MnemeError

USAGE = (
    "usage: mneme tune --config CONFIG.yaml --search SEARCH.yaml --trials N "
    "[--study_dir DIR] [fit overrides]"
)


def parse_config(config_args: list[str]) -> Any:
    """The run's whole configuration, as the CLI's parser makes it for ``mneme fit`` (a
    jsonargparse Namespace, every default filled in): every key a trial may set is there."""
    if not any(a == "--config" or a.startswith("--config=") for a in config_args):
        raise ConfigError("--config: `mneme tune` needs the config to search over")
    return build_cli(["fit", *config_args], parse_only=True)


def check_values(space: dict[str, Any], config: Any) -> None:
    """Every value the search may set, judged as the CLI judges a config's text before
    anything is imported: a class path outside its field's trees is refused here (each
    trial's configuration is parsed as a Namespace, which skips that text check)."""
    from mneme.app.tune.config_keys import field_of, resolve_key
    from mneme.app.tune.search_file import categorical_labels

    for key, spec in space.items():
        field = field_of(resolve_key(config["fit"], str(key)))
        values = [None]
        if isinstance(spec, dict) and spec.get("type") == "categorical":
            values = list(categorical_labels(spec.get("choices"), f"space.{key}").values())
        for value in values:
            try:
                walk(value, field)
            except ConfigError as error:
                raise ConfigError(f"space.{key}: {error}") from None


def fit(config: Any, extra_callbacks: list[Any]) -> None:
    """One ``mneme fit`` of a parsed configuration in this process; a failure of that
    trial's own (a sampled value, a non-finite loss) is a ``TrialFailed``."""
    from mneme.app.cli.messages import summarize_library_error
    from mneme.app.tune.search_file import ObjectiveKeyError
    from mneme.app.tune.trials import TrialFailed

    try:
        build_cli(config, extra_callbacks=extra_callbacks)
    except (RunInterrupted, ObjectiveKeyError, KeyboardInterrupt):
        raise  # the search ends: a signal, or an objective no trial can meet
    except MnemeError as error:  # ConfigError of a sampled value, non-finite loss, ...
        raise TrialFailed(str(error)) from None
    except Exception as error:  # noqa: BLE001 - any failure of one trial is that trial's
        summary = summarize_library_error(error) or f"{type(error).__name__}: {error}"
        raise TrialFailed(" ".join(summary.split())[:400]) from None
    finally:
        release_claims()


def tune(config_args: list[str], search_path: str, trials: int, study_dir: str | None = None):
    """Run (or continue) the search to ``trials`` finished trials; returns the study."""
    import logging

    import optuna
    from mneme.app.tune.search import check_trials, search
    from mneme.app.tune.search_file import load_search, parse_objective, parse_space

    optuna.logging.get_verbosity()  # makes optuna attach its stderr handler
    for handler in logging.getLogger("optuna").handlers:  # a filter on the handler sees
        if _one_line_failures not in handler.filters:  # the records of every optuna.* logger
            handler.addFilter(_one_line_failures)
    check_trials(trials)
    if not any(a == "--config" or a.startswith("--config=") for a in config_args):
        raise ConfigError("--config: `mneme tune` needs the config to search over")
    spec = load_search(search_path)
    parse_objective(spec.get("objective"))
    parse_space(spec["space"], None)  # the search file's own mistakes, before any parsing
    config = parse_config(config_args)
    check_values(spec["space"], config)
    return search(config, search_path, trials, study_dir, fit, " ".join(config_args), spec)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The tune options; the rest (``--config``, fit overrides) goes to the CLI's parser."""
    from mneme.app.tune import search

    parser = argparse.ArgumentParser(
        prog="mneme tune",
        usage=USAGE.removeprefix("usage: "),
        description="Hyperparameter search over any config key with Optuna.",
        epilog="the search file (--search):\n"
        + (search.__doc__ or "").split("The search file::", 1)[-1].split("Keys:", 1)[0].rstrip(),
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
    from mneme.app.cli.error_mode import debug_mode
    from mneme.app.tune.trials import TrialFailed

    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, TrialFailed) and not debug_mode():
        record.exc_info = None
    return True


def main(argv: list[str]) -> None:
    """``mneme tune ...``: one line on the user's errors."""
    from mneme.app.cli.error_mode import debug_mode, rank_zero_error

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
