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
from mneme.callbacks.base import ExperienceCallback, affects_training

KEY = "mneme_run"
# 2: the strategies are every callback that declares it changes training (augmentation and
# unfreezing included); 1 listed only the ExperienceCallbacks among them.
VERSION = 2
# field of the definition -> the config field a user changes
FIELDS = {
    "benchmark": "data.benchmark",
    "benchmark_args": "data.benchmark_args",
    "class_order": "data.benchmark_args (the class order)",
    "epochs_per_experience": "data.epochs_per_experience",
    "sample_keys": "data.sample_keys",
    "strategies": "trainer.callbacks (the strategies)",
    "optimizer": "model.optimizer",
}
# Optimizer settings that are plain data (a tensor-valued setting is left out).
PLAIN = (int, float, str, bool, type(None), tuple, list)


def run_definition(trainer: Any, version: int = VERSION) -> dict[str, Any]:
    """The stream (from the datamodule's ``run_definition()``) and the strategies: the
    state keys of the callbacks that declare they change training
    (:func:`mneme.callbacks.base.affects_training`); and the optimizer. ``version``: as a
    checkpoint of that version records it (1: its ExperienceCallbacks only)."""
    module = getattr(trainer, "lightning_module", None)
    return definition_of(trainer.datamodule, trainer.callbacks, module, version)


def definition_of(
    datamodule: Any, callbacks: list, module: Any, version: int = VERSION
) -> dict[str, Any]:
    """:func:`run_definition` from its parts (the CLI compares a resume before ``fit``
    writes anything: an earlier run's folder is never written by a refused resume)."""
    definition = dict(datamodule.run_definition())
    definition["strategies"] = sorted(
        cb.state_key
        for cb in callbacks
        if affects_training(cb) and (version > 1 or isinstance(cb, ExperienceCallback))
    )
    optimizer = optimizer_definition(module)
    if optimizer is not None:
        definition["optimizer"] = optimizer
    return {"version": version, **definition}


def optimizer_definition(module: Any) -> dict[str, Any] | None:
    """The optimizer the config builds: its class and settings (``lr``, ``momentum``, ...),
    read from a throwaway instance over one parameter, so a checkpoint's and a resumed
    config's compare alike (Lightning restores the saved optimizer, settings included, so
    a changed setting would be written into the run's config and not used)."""
    import torch

    factory = getattr(module, "optimizer_factory", None)
    if not callable(factory):
        return None
    try:
        probe = factory([torch.nn.Parameter(torch.zeros(1))])
    except Exception:  # noqa: BLE001 - a bad setting is reported where the optimizer is built
        return None
    settings = {k: v for k, v in probe.defaults.items() if isinstance(v, PLAIN)}
    return {"class": f"{type(probe).__module__}.{type(probe).__qualname__}", **settings}


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``current`` that differ from ``saved`` (keys of both)."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return {}
    return {
        key: value
        for key, value in current.items()
        if key in saved and _plain(saved[key]) != _plain(value)
    }


def check_same_run(saved: dict[str, Any], current: dict[str, Any], allowed: set[str]) -> None:
    """Refuse a resume whose run differs from the checkpoint's in a field not ``allowed``."""
    unknown = sorted(allowed - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"data.allow_resume_changes: unknown {unknown}; name some of {sorted(FIELDS)}"
        )
    for field, config_field in FIELDS.items():
        if field not in saved or field not in current:
            continue
        if field == "optimizer" and _class(saved[field]) != _class(current[field]):
            # a restored optimizer state fits only its own class: never accepted
            raise ConfigError(
                f"ckpt_path: the checkpoint's run trains with {_class(saved[field])}, "
                f"this run with {_class(current[field])} (model.optimizer); a resume "
                "keeps the optimizer's class: use the checkpoint's, or start a new run"
            )
        if field in allowed:
            continue
        old, new = saved[field], current[field]
        if isinstance(old, dict) and isinstance(new, dict) and field == "optimizer":
            new = changed_settings(old, new)  # name only the settings that changed
            old = {key: old[key] for key in new}
        if _plain(old) != _plain(new):
            raise ConfigError(
                f"ckpt_path: the checkpoint's run has {config_field} {_show(old)}, "
                f"this run {_show(new)}; resume with the checkpoint's config, or "
                f"accept the change with --data.allow_resume_changes '[{field}]'"
                + (" (applied to the restored optimizer)" if field == "optimizer" else "")
            )


def _class(optimizer: Any) -> Any:
    """The class of an optimizer definition (a checkpoint's may be anything)."""
    return optimizer.get("class") if isinstance(optimizer, dict) else optimizer


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
