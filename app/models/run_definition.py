"""What defines a run, stored in each checkpoint, and the check that a resume continues the
same run.

A checkpoint resumed with another stream, class order, schedule or strategy set would mix
two runs in one accuracy matrix (a naive checkpoint resumed with EWC has no Fisher for the
experiences it finished). The definition is written by :class:`ContinualModule` into every
checkpoint (``checkpoint["mneme_run"]``) and compared on restore; a difference is refused
in one line naming both values, unless ``data.allow_resume_changes`` lists it.
"""

from __future__ import annotations

from typing import Any

from mneme.app.core.errors import ConfigError
from mneme.callbacks.base import ExperienceCallback

KEY = "mneme_run"
VERSION = 1
# field of the definition -> the config field a user changes
FIELDS = {
    "benchmark": "data.benchmark",
    "benchmark_args": "data.benchmark_args",
    "class_order": "data.benchmark_args (the class order)",
    "epochs_per_experience": "data.epochs_per_experience",
    "sample_keys": "data.sample_keys",
    "strategies": "trainer.callbacks (the strategies)",
}


def run_definition(trainer: Any) -> dict[str, Any]:
    """The stream (from the datamodule's ``run_definition()``) and the strategies: the
    state keys of the callbacks that change training."""
    definition = dict(trainer.datamodule.run_definition())
    definition["strategies"] = sorted(
        cb.state_key
        for cb in trainer.callbacks
        if isinstance(cb, ExperienceCallback) and cb.affects_training
    )
    return {"version": VERSION, **definition}


def check_same_run(saved: dict[str, Any], current: dict[str, Any], allowed: set[str]) -> None:
    """Refuse a resume whose run differs from the checkpoint's in a field not ``allowed``."""
    unknown = sorted(allowed - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"data.allow_resume_changes: unknown {unknown}; name some of {sorted(FIELDS)}"
        )
    for field, config_field in FIELDS.items():
        if field in allowed or field not in saved or field not in current:
            continue
        if _plain(saved[field]) != _plain(current[field]):
            raise ConfigError(
                f"ckpt_path: the checkpoint's run has {config_field} {_show(saved[field])}, "
                f"this run {_show(current[field])}; resume with the checkpoint's config, or "
                f"accept the change with --data.allow_resume_changes '[{field}]'"
            )


def _plain(value: Any) -> Any:
    """Compare tuples and lists alike (YAML gives lists, code often tuples)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _show(value: Any, limit: int = 120) -> str:
    text = repr(_plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
