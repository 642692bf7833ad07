"""What ``data.benchmark`` may name, and the check that its arguments fit.

A config (a YAML file someone shared, a command line) names the benchmark by import path,
and the datamodule calls it with ``benchmark_args``: left open, that is "call any installed
function with these arguments" (``os.system``). So a path is accepted only when it is a
benchmark:

- an Avalanche benchmark: a function defined in ``avalanche.benchmarks.classic`` or
  ``avalanche.benchmarks.scenarios`` (the classic factories, the generators), or a subclass
  of Avalanche's ``CLScenario``;
- a Mneme stream: a factory registered with :func:`stream` (Mneme's own streams are; a
  user's stream can be, when its module is imported before the datamodule is built);
- a callable trusted from outside every config: listed in the ``MNEME_TRUSTED_BENCHMARKS``
  environment variable (comma-separated import paths), or declared by an installed package
  as an entry point of the ``mneme.streams`` group (``name = "pkg.module:Factory"``).

Trust never comes from a config (nor from a ``mneme tune`` search space, nor from a
checkpoint): a list that a shared config could extend (the former
``data.trusted_benchmarks``) would trust whatever that config then names (``os.system``).
The environment, the installed packages and the user's own code (``@stream``, imported
before the CLI runs) are the user's, not the config author's.

The import path is judged as text first, so that a module outside those trees is never
imported unless trusted; what the import returns is judged again before it is called.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from mneme.app.core.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

AVALANCHE_TREE = "avalanche.benchmarks."
# Where Avalanche defines its benchmark factories and generators; its ``datasets`` and
# ``utils`` subpackages hold download, extraction and dataset helpers, which are not.
AVALANCHE_FACTORIES = ("avalanche.benchmarks.classic.", "avalanche.benchmarks.scenarios.")
MNEME_TREE = "mneme.datamodules."
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")

# Registered streams by canonical import path (module.qualname), and the callables
# themselves (the same factory is also reachable through a package re-export).
_STREAMS: dict[str, Callable[..., Any]] = {}

FIX = (
    "name an Avalanche benchmark (e.g. avalanche.benchmarks.classic.SplitMNIST) or a Mneme "
    "stream (e.g. mneme.datamodules.SplitDigits), or trust your own factory outside the "
    "config: @stream in your code, the MNEME_TRUSTED_BENCHMARKS environment variable, or a "
    "`mneme.streams` entry point"
)
TRUSTED_VARIABLE = "MNEME_TRUSTED_BENCHMARKS"
ENTRY_POINT_GROUP = "mneme.streams"


def stream(factory: F) -> F:
    """Register ``factory`` as a stream ``data.benchmark`` may name (a decorator).

    Example::

        from mneme.datamodules.streams.registry import stream

        @stream
        def MyStream(n_experiences: int = 5): ...
    """
    _STREAMS[f"{factory.__module__}.{factory.__qualname__}"] = factory
    return factory


def registered_streams() -> list[str]:
    """Import paths of the registered streams, sorted."""
    return sorted(_STREAMS)


def _refuse(class_path: str, why: str) -> ConfigError:
    return ConfigError(f"data.benchmark: '{class_path}' {why}; {FIX}")


def _is_avalanche_benchmark(obj: Any) -> bool:
    """A ``CLScenario`` subclass, or a function that Avalanche defines among its benchmark
    factories (checked on the object: a name merely re-exported there, such as
    torchvision's ``download_url``, is not)."""
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario

    if inspect.isclass(obj):
        return issubclass(obj, CLScenario)
    module = getattr(obj, "__module__", None) or ""
    return inspect.isfunction(obj) and module.startswith(AVALANCHE_FACTORIES)


def _import(class_path: str) -> Any:
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(
            f"data.benchmark: cannot import '{class_path}'; name a benchmark such as "
            "avalanche.benchmarks.classic.SplitMNIST or mneme.datamodules.SplitDigits"
        ) from None


def trusted_benchmarks() -> set[str]:
    """Import paths trusted from outside every config: ``MNEME_TRUSTED_BENCHMARKS`` and the
    ``mneme.streams`` entry points of installed packages (read, not loaded)."""
    from importlib.metadata import entry_points

    listed = os.environ.get(TRUSTED_VARIABLE, "")
    trusted = {e for e in re.split(r"[,\s]+", listed) if e}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        module, _, attr = entry.value.partition(":")
        trusted.add(f"{module.strip()}.{attr.strip()}" if attr else module.strip())
    return trusted


def resolve_benchmark(class_path: str, arguments: dict[str, Any]) -> Callable[..., Any]:
    """The benchmark factory or class named by ``class_path``, refused unless it is a
    benchmark (see the module docstring) or trusted from outside the config
    (:func:`trusted_benchmarks`); ``arguments`` must fit its signature. Nothing is called
    here, and nothing outside the Avalanche and Mneme trees is imported unless trusted."""
    if not isinstance(class_path, str) or not _IMPORT_PATH.fullmatch(class_path):
        raise _refuse(str(class_path), "is not an import path (package.module.name)")
    trusted = trusted_benchmarks()
    if any(part.startswith("_") for part in class_path.split(".")) and class_path not in trusted:
        raise _refuse(class_path, "is private (a name starting with '_')")
    if class_path in _STREAMS:  # registered: its module is imported already
        factory = _STREAMS[class_path]
    elif class_path in trusted:
        factory = _import(class_path)
        if not callable(factory):
            raise ConfigError(
                f"data.benchmark: '{class_path}' (trusted by {TRUSTED_VARIABLE} or an entry "
                "point) is not callable; trust a benchmark factory or class"
            )
    elif class_path.startswith(AVALANCHE_TREE):
        factory = _import(class_path)
        if not _is_avalanche_benchmark(factory):
            raise _refuse(class_path, "is not a benchmark factory or a CLScenario")
    elif class_path.startswith(MNEME_TREE):
        factory = _import(class_path)
        if not any(factory is s for s in _STREAMS.values()):
            raise _refuse(class_path, "is not a registered stream")
    else:
        raise _refuse(class_path, "is outside the Avalanche and Mneme benchmarks (not imported)")
    try:
        inspect.signature(factory).bind(**arguments)
    except TypeError as err:
        raise ConfigError(f"data.benchmark_args: {err} (for {class_path})") from None
    return factory
