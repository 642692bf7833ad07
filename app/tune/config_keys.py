"""The search file's config keys on the parsed configuration.

The configuration is the CLI parser's own (a jsonargparse ``Namespace`` with every default
filled in; a plain dict is read alike), so a key is there exactly when ``mneme fit`` takes
it. What jsonargparse has no syntax for is resolved here: a list entry named by its index
(``trainer.callbacks[0]``) or by its class name (``trainer.callbacks.EWC``), and
``init_args`` left out (``model.optimizer.lr`` is ``model.init_args.optimizer.init_args.lr``).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from mneme.app.core.errors import ConfigError


def _mapping(node: Any) -> dict[str, Any] | None:
    """A node's named children: a Namespace's attributes, a dict's items; else None."""
    from jsonargparse import Namespace

    if isinstance(node, Namespace):
        return vars(node)
    return node if isinstance(node, dict) else None


def split_key(key: str) -> list[str | int]:
    """``trainer.callbacks[0].init_args.x`` -> ``['trainer', 'callbacks', 0, 'init_args', 'x']``."""
    parts: list[str | int] = []
    for piece in key.split("."):
        match = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", piece)
        if not match or (not match.group(1) and not match.group(2)):
            raise ConfigError(f"space.{key}: not a config key (write a.b.c, or a.b[0].c)")
        if match.group(1):
            parts.append(match.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return parts


def class_name(item: Any) -> str | None:
    children = _mapping(item)
    path = children.get("class_path") if children is not None else None
    return path.rsplit(".", 1)[-1] if isinstance(path, str) else None


def resolve_key(config: Any, key: str) -> list[str | int]:
    """The full path of ``key`` in ``config`` (``init_args`` filled in, a list entry's
    class name turned into its index); a key the config lacks is refused with the
    closest key it has."""
    path: list[str | int] = []
    node: Any = config
    for part in split_key(key):
        children = _mapping(node)
        if children is not None and isinstance(part, str):
            inner = _mapping(children.get("init_args"))
            if part in children:
                path.append(part)
            elif inner is not None and part in inner:
                path.append("init_args")
                node = children["init_args"]
                path.append(part)
            else:
                _unknown_key(config, key)
        elif isinstance(node, list):
            if isinstance(part, int):
                if part >= len(node):
                    _unknown_key(config, key)
                path.append(part)
            else:
                found = [i for i, item in enumerate(node) if class_name(item) == part]
                if len(found) > 1:
                    raise ConfigError(
                        f"space.{key}: the list holds {len(found)} {part}s; name one by index "
                        f"({'.'.join(map(str, path))}[{found[0]}])"
                    )
                if not found:
                    _unknown_key(config, key)
                path.append(found[0])
        else:
            _unknown_key(config, key)
        node = _child(node, path[-1])
    return path


def _child(node: Any, part: str | int) -> Any:
    children = _mapping(node)
    return children[str(part)] if children is not None else node[part]


def field_of(path: list[str | int]) -> str:
    """The config field a resolved path sets, as the CLI's checks name fields
    (``['trainer', 'callbacks', 0]`` -> ``trainer.callbacks``)."""
    return ".".join(str(p) for p in path if isinstance(p, str) and p != "init_args")


def config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of the config, as ``resolve_key`` takes them (list entries by class name
    where unique), each also without its ``init_args`` parts."""
    keys = []
    children = _mapping(node)
    if children is not None:
        items = [(str(k), v) for k, v in children.items() if not str(k).startswith("__")]
    elif isinstance(node, list):
        names = [class_name(item) for item in node]
        items = [
            (n if n and names.count(n) == 1 else f"[{i}]", v)
            for i, (n, v) in enumerate(zip(names, node, strict=True))
        ]
    else:
        return keys
    for name, value in items:
        key = f"{prefix}{name}" if name.startswith("[") or not prefix else f"{prefix}.{name}"
        keys.append(key)
        keys += config_keys(value, key)
    return keys


def _unknown_key(config: Any, key: str) -> None:
    keys = config_keys(config)
    keys += [k.replace(".init_args", "") for k in keys]
    raise ConfigError(
        f"space.{key}: the config has no such key{close(key, keys, cutoff=0.5)} "
        "(`mneme fit --config X --print_config` lists them)"
    )


def set_key(config: Any, key: str, value: Any) -> None:
    """Set ``key`` (resolved as :func:`resolve_key` does) to ``value`` in ``config``."""
    path = resolve_key(config, key)
    node = config
    for part in path[:-1]:
        node = _child(node, part)
    children = _mapping(node)
    if children is not None and not isinstance(node, dict):
        setattr(node, str(path[-1]), value)
    else:
        node[path[-1]] = value


def close(word: str, candidates, cutoff: float = 0.6) -> str:
    """``; did you mean 'x'?`` for the closest candidate, or nothing."""
    found = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=1, cutoff=cutoff)
    return f"; did you mean '{found[0]}'?" if found else ""
