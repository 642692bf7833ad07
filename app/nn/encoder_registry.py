"""Encoder types by name (``type:`` in a config): the one registration point.

A type is a class registered with :func:`encoder_type`; :func:`encoder_class` resolves a
name, importing Mneme's module that defines a built-in type when a config names it
(:data:`BUILTIN_MODULES`), so that a type never depends on which other module happened to
be imported first. :mod:`mneme.app.nn.modalities` builds the encoders from them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from mneme.app.core.errors import ConfigError
from torch import nn

DEFAULT_TYPES = {"image": "timm", "text": "open_clip_text", "audio": "log_mel"}
# Encoder types by name (``type:`` in a config): open, so a new modality is one new file.
ENCODER_TYPES: dict[str, Callable[..., nn.Module]] = {}
# Mneme's encoder types, each defined in a module of its own, by name -> the module whose
# import registers them: resolved when a config names them.
BUILTIN_MODULES = {
    "timm": "mneme.app.nn.timm_image",
    "open_clip_visual": "mneme.app.nn.open_clip_towers",
    "open_clip_text": "mneme.app.nn.open_clip_towers",
    "log_mel": "mneme.app.nn.log_mel",
    "hf_text": "mneme.app.nn.hf_text",
}


def encoder_class(name: Any, field: str = "model.encoders") -> Callable[..., nn.Module]:
    """The class registered as encoder type ``name`` (importing the Mneme module that
    defines it, if it is one of :data:`BUILTIN_MODULES`)."""
    given, name = name, name if isinstance(name, str) else None
    if name not in ENCODER_TYPES and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    if name is None or name not in ENCODER_TYPES:
        known = sorted({*ENCODER_TYPES, *BUILTIN_MODULES})
        raise ConfigError(f"{field}.type: one of {known}, got {given!r}")
    return ENCODER_TYPES[name]


def encoder_type(name: str) -> Callable[[type], type]:
    """Register an encoder class under ``name``. The class takes ``input_shape`` (one
    sample's shape) first, then its config arguments, and sets ``out_dim``.

    Example::

        @encoder_type("my_sensor")
        class SensorEncoder(nn.Module):
            def __init__(self, input_shape, width: int = 64): ...
    """

    def register(cls: type) -> type:
        if name in ENCODER_TYPES and ENCODER_TYPES[name] is not cls:
            raise ValueError(f"encoder type '{name}' is registered already")
        ENCODER_TYPES[name] = cls
        return cls

    return register
