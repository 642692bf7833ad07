"""The run configuration as hyperparameters (TensorBoard's HParams tab, ``hparams.yaml``):
the model, optimizer, callbacks, stream and seed that tell one run from another."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from mneme.callbacks.base import affects_training
from mneme.callbacks.reporting.cli_config import cli_callback_arguments

# Optimizer defaults that only pick an implementation, not the optimization.
OPTIMIZER_SWITCHES = ("foreach", "fused", "differentiable", "capturable")
# Arguments the one-line overview of a run names even at their defaults: what is trained on
# what, and the learning rate.
ALWAYS_DESCRIBED = (
    "benchmark",
    "benchmark_args",
    "epochs_per_experience",
    "encoder",
    "encoders",
    "lr",
)


def run_config(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """What tells one run from another. Short names first (capitalized: they sort first, and
    the HParams tab shows its first five columns, each cut at about 15 characters):
    ``Callbacks`` (class names, ``"Replay"``, ``"none"``), ``Data`` (the benchmark's name),
    ``Model`` (the encoder's name, else the class), ``Optimizer`` (class and learning rate)
    and ``Seed`` (as text: a label, which the tab would print as ``0.0000``); then nested,
    the long forms: ``described/<Name>``, the
    one-line call with every argument that differs from its default
    (``"Replay(buffer_size=200, policy='class_balanced')"``), and every argument (loggers
    flatten them with ``/``): ``model`` (class and hyperparameters), ``optimizer`` (class
    and arguments), ``callbacks`` (each callback's ``__init__`` arguments, by class) and
    ``data`` (the datamodule's hyperparameters). The trainer's bookkeeping callbacks
    (progress bar and lines, checkpoints, summaries, the cost meter, this one) are left
    out."""
    overview: dict[str, Any] = {}
    described: dict[str, str] = {}
    config: dict[str, Any] = {}
    callbacks: dict[str, Any] = {}
    calls, names = [], []
    from_cli = cli_callback_arguments(trainer)  # LightningCLI's parsed config, when it ran
    for callback in trainer.callbacks:
        if not affects_training(callback):  # a dashboard or bookkeeping: not the run
            continue
        name = type(callback).__name__
        key = name if name not in callbacks else f"{name}_{len(callbacks)}"
        parsed = from_cli(callback)
        callbacks[key] = _plain(parsed) if parsed is not None else _init_arguments(callback)
        calls.append(_call(name, _changed(type(callback), callbacks[key])))
        names.append(name)
    overview["Callbacks"] = ", ".join(names) or "none"
    described["Callbacks"] = ", ".join(calls) or "none"
    config["callbacks"] = callbacks
    if trainer.datamodule is not None:
        data = config["data"] = _module_config(trainer.datamodule)
        described["Data"] = _call(
            type(trainer.datamodule).__name__, _changed(type(trainer.datamodule), data)
        )
        benchmark = data.get("benchmark")
        overview["Data"] = (
            str(benchmark).rsplit(".", 1)[-1] if benchmark else type(trainer.datamodule).__name__
        )
    config["model"] = _module_config(pl_module)
    described["Model"] = _call(type(pl_module).__name__, _changed(type(pl_module), config["model"]))
    overview["Model"] = _short_model(type(pl_module).__name__, config["model"])
    for i, optimizer in enumerate(trainer.optimizers):
        key = "optimizer" if i == 0 else f"optimizer{i}"
        config[key] = _optimizer_config(optimizer)
        described[key.capitalize()] = _call(
            type(optimizer).__name__, _changed(type(optimizer), config[key])
        )
        lr = {"lr": config[key]["lr"]} if "lr" in config[key] else {}
        overview[key.capitalize()] = _call(type(optimizer).__name__, lr)
    if "PL_GLOBAL_SEED" in os.environ:  # what seed_everything set
        overview["Seed"] = str(int(os.environ["PL_GLOBAL_SEED"]))
    return {**overview, "described": described, **config}


def _short_model(name: str, config: dict[str, Any]) -> str:
    """What the HParams tab shows whole (about 15 characters): the encoder's name
    (``mneme_mlp``, a timm name), else the module's class."""
    encoder = config.get("encoder")
    return encoder if isinstance(encoder, str) and encoder else name


def _call(name: str, arguments: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_config(module) -> dict[str, Any]:
    hparams = dict(module.hparams)
    config = {"class": hparams.get("_class_path") or _class_path(type(module))}
    config.update({k: _plain(v) for k, v in hparams.items() if not k.startswith("_")})
    return config


def _optimizer_config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    cls = type(optimizer)
    path = _class_path(cls)
    if getattr(torch.optim, cls.__name__, None) is cls:
        path = f"torch.optim.{cls.__name__}"
    arguments = {
        k: _plain(v)
        for k, v in optimizer.defaults.items()
        if k not in OPTIMIZER_SWITCHES and v is not None
    }
    return {"class": path, **arguments}


def _parameters(cls: type) -> list[inspect.Parameter]:
    """The named ``__init__`` parameters of ``cls``."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p for p in parameters if p.name != "self" and p.kind not in skip]


def _init_arguments(obj: Any) -> dict[str, Any]:
    """The ``__init__`` arguments an object holds as attributes of the same name."""
    names = [p.name for p in _parameters(type(obj)) if hasattr(obj, p.name)]
    return {name: _plain(getattr(obj, name)) for name in names}


def _changed(cls: type, arguments: dict[str, Any]) -> dict[str, Any]:
    """The ``arguments`` that differ from the defaults of ``cls.__init__`` (and those of
    ``ALWAYS_DESCRIBED``)."""
    defaults = {p.name: p.default for p in _parameters(cls)}
    return {
        name: value
        for name, value in arguments.items()
        if name in defaults
        and (
            name in ALWAYS_DESCRIBED
            or defaults[name] is inspect.Parameter.empty
            or _plain(defaults[name]) != value
        )
    }


def _plain(value: Any) -> Any:
    """A value as YAML and TensorBoard take it: scalars, lists and dicts of them, else text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
