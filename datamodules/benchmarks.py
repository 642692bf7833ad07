"""What ``data.benchmark`` may name, and the check that its arguments fit."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from mneme.datamodules.errors import ConfigError


def resolve_benchmark(class_path: str, arguments: dict[str, Any]) -> Callable[..., Any]:
    """Import a benchmark factory or class by ``class_path`` and check that ``arguments`` fit
    its signature, with an error that names the field."""
    module_name, _, attr = class_path.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(
            f"data.benchmark: cannot import '{class_path}'; name a benchmark such as "
            "avalanche.benchmarks.classic.SplitMNIST or mneme.datamodules.SplitDigits"
        ) from None
    try:
        inspect.signature(factory).bind(**arguments)
    except TypeError as err:
        raise ConfigError(f"data.benchmark_args: {err} (for {class_path})") from None
    return factory
