"""The lazy exports (PEP 562) of Mneme's three packages, written once.

``mneme.app.X``, ``mneme.callbacks.X`` and ``mneme.datamodules.X`` are the names configs
use; each package maps them onto the module that defines them and imports that module at
the first read, so that importing one callback, or ``mneme --help``, loads only what it
needs.

Example (a package's ``__init__.py``)::

    _EXPORTS = {"Replay": "mneme.callbacks.strategies.replay"}
    __all__ = list(_EXPORTS)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's ``__getattr__`` and ``__dir__`` over ``exports`` (name -> module)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
