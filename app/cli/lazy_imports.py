"""Imports that other libraries make at their own import time and a Mneme run never uses,
deferred until something first reads them.

timm (``timm.utils.summary``) and Avalanche (``avalanche.evaluation.metrics``) both run
``import wandb`` at import time, for logging helpers Mneme does not call; on the 2-core
machine that import alone takes about 0.85 s of every run's start. A deferred module is bound
in ``sys.modules`` at once and runs its code at the first read of an attribute it does not
have yet, so a run that does log to Weights & Biases (Lightning's ``WandbLogger``) gets the
real module, unchanged.

Written here rather than with ``importlib.util.LazyLoader``: its module loads on any
attribute read, and ``inspect.getmodule`` (which torch calls while it registers operators)
reads ``__file__`` off every module in ``sys.modules``, which loaded wandb within torch's
own import.
"""

from __future__ import annotations

import importlib.util
import sys
import types

# Modules imported for their name only by libraries Mneme imports on every run.
DEFERRED = ("wandb",)


class _DeferredModule(types.ModuleType):
    """A module whose code has not run yet. Its metadata (``__name__``, ``__file__``,
    ``__spec__``, ``__loader__``) is there from the start, so walking ``sys.modules`` does
    not load it; ``__path__`` is not, so importing a submodule loads the package first."""

    def __getattr__(self, attr: str):  # only for attributes the module does not have
        spec = self.__spec__
        self.__class__ = types.ModuleType  # an ordinary module from here on
        if spec.submodule_search_locations is not None:
            self.__path__ = spec.submodule_search_locations
        spec.loader.exec_module(self)
        return getattr(self, attr)


def defer_import(name: str) -> bool:
    """Bind ``name`` in ``sys.modules`` to a module that loads on first use. Nothing changes
    if it is imported already or not installed. Returns whether it was deferred."""
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return False
    module = _DeferredModule(name)
    module.__spec__, module.__loader__ = spec, spec.loader
    module.__file__, module.__package__ = spec.origin, spec.parent
    sys.modules[name] = module
    return True


def defer_unused_imports() -> None:
    """Before Lightning, timm and Avalanche load: defer what they import and never use."""
    for name in DEFERRED:
        defer_import(name)
