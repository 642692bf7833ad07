"""What the command line and the ``--config`` files say, read as text before jsonargparse
parses them: parsing a ``class_path`` imports the module it names (and runs its code), so
a class path is judged against what its field is for *before* anything is imported.

Also refused here, in one line naming the key: a YAML key given twice in one mapping
(YAML keeps the last silently), a top-level section that is not a mapping (``trainer: 5``),
and ``data.trusted_benchmarks`` (trust no longer comes from a config; see
:mod:`mneme.datamodules.streams.registry`).

Trust for a class outside a field's trees comes from outside every config and checkpoint:
the ``MNEME_TRUSTED_CLASSES`` environment variable (comma-separated import paths or
package prefixes), or the user's own code, which defined and imported the class before the
CLI ran (importing an imported module runs nothing).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError

TRUSTED_CLASSES_VARIABLE = "MNEME_TRUSTED_CLASSES"
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")

# The field a class path is given at (its key path without ``init_args``) -> the trees it
# may name. The same rules by the field's last name, where it is nested deeper (an
# optimizer inside a callback's arguments).
FIELD_TREES: dict[str, tuple[str, ...]] = {
    "model": ("mneme.app.",),
    "data": ("mneme.datamodules.",),
    "trainer.callbacks": ("mneme.callbacks.", "lightning.pytorch.callbacks."),
    "trainer.logger": ("lightning.pytorch.loggers.",),
    "trainer.strategy": ("lightning.pytorch.strategies.",),
    "trainer.accelerator": ("lightning.pytorch.accelerators.",),
    "trainer.profiler": ("lightning.pytorch.profilers.",),
    "trainer.plugins": ("lightning.pytorch.plugins.", "lightning.fabric.plugins."),
}
LAST_NAME_TREES: dict[str, tuple[str, ...]] = {
    "optimizer": ("torch.optim.",),
    "lr_scheduler": ("torch.optim.lr_scheduler.",),
    "scheduler": ("torch.optim.lr_scheduler.",),
    "callbacks": FIELD_TREES["trainer.callbacks"],
    "logger": FIELD_TREES["trainer.logger"],
}
# Any other field: the libraries Mneme is built on.
LIBRARY_TREES = ("mneme.", "torch.", "lightning.", "torchmetrics.", "timm.", "transformers.")
# Top-level sections that hold options (a mapping, or null for the defaults); ``model`` and
# ``data`` may also be given as a class path.
SECTIONS = ("trainer", "checkpoint", "metrics", "cost", "finite_loss_guard", "fewshot_metrics")

TRUSTED_BENCHMARKS_MOVED = (
    "data.trusted_benchmarks: no longer read from a config (a list a config can extend "
    "trusts whatever that config names); register your own stream with @stream "
    "(mneme.datamodules.streams.registry) in code imported before the CLI runs, list it in "
    "the MNEME_TRUSTED_BENCHMARKS environment variable, or declare it as a `mneme.streams` "
    "entry point of your package"
)


def check_raw_config(args: list[str]) -> None:
    """Refuse, before jsonargparse imports anything, the class paths the command line and
    its ``--config`` files give where their fields do not take them, YAML keys given twice,
    sections that are not mappings, and ``data.trusted_benchmarks``."""
    for key, value in options(args):
        if key == "config":
            path = Path(value)
            if path.is_file():
                content = load_yaml(path, f"--config {path}")
                if isinstance(content, dict):
                    check_sections(content, f"--config {path}")
                    walk(content, "")
            continue
        field = _field(key)
        if field == "data.trusted_benchmarks":
            raise ConfigError(TRUSTED_BENCHMARKS_MOVED)
        if key.endswith(".class_path"):
            check_class_path(_field(key[: -len(".class_path")]), value)
            continue
        parsed = _parse_value(value, field)
        if field in SECTIONS and parsed is not None and not isinstance(parsed, dict):
            raise ConfigError(_not_a_mapping(f"--{key}", field, parsed))
        walk(parsed, field)


def options(args: list[str]) -> Iterator[tuple[str, str]]:
    """``(key, value)`` of each ``--key value``, ``--key=value`` and ``--key+=value``."""
    for i, token in enumerate(args):
        if not token.startswith("--") or token == "--":
            continue
        if "=" in token:
            key, value = token[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = token[2:], args[i + 1]
        else:
            continue
        yield key.rstrip("+"), value


def _field(key: str) -> str:
    """The field a key sets, without ``init_args`` (``model.init_args.optimizer`` ->
    ``model.optimizer``)."""
    return ".".join(part for part in key.split(".") if part not in ("init_args", "dict_kwargs"))


def _parse_value(value: str, field: str) -> Any:
    """A command-line value as jsonargparse reads it: YAML text, or, for a section or a
    class field, a file of YAML (other fields' files, e.g. a checkpoint, are not read)."""
    import yaml

    takes_file = field in (*SECTIONS, "model", "data") or trees_of(field, strict=True)
    if takes_file and Path(value).is_file():  # jsonargparse reads it as YAML
        return load_yaml(Path(value), value)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def walk(node: Any, field: str) -> None:
    """Check every class path in ``node``, found at ``field``."""
    if field == "data.trusted_benchmarks":
        raise ConfigError(TRUSTED_BENCHMARKS_MOVED)
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            check_class_path(field, node["class_path"])
        for key, value in node.items():
            if key in ("init_args", "dict_kwargs"):
                walk(value, field)
            elif key != "class_path" and isinstance(key, str):
                walk(value, f"{field}.{key}" if field else key)
    elif isinstance(node, list):
        for item in node:
            walk(item, field)
    elif isinstance(node, str) and (trees_of(field, strict=True) or field == "config"):
        if Path(node).is_file():  # a section given as a file of its own (jsonargparse reads it)
            walk(load_yaml(Path(node), node), "" if field == "config" else field)
        elif _IMPORT_PATH.fullmatch(node) and field != "config":
            check_class_path(field, node)  # a class field given a class path as a string


def trees_of(field: str, strict: bool = False) -> tuple[str, ...]:
    """The trees ``field`` may name a class from (``strict``: only for a field known to
    take a class, so that other strings are left alone)."""
    if field in FIELD_TREES:
        return FIELD_TREES[field]
    last = field.rsplit(".", 1)[-1]
    if last in LAST_NAME_TREES:
        return LAST_NAME_TREES[last]
    return () if strict else LIBRARY_TREES


def check_class_path(field: str, class_path: Any) -> None:
    """Refuse ``class_path`` at ``field`` unless it lies in the field's trees or is trusted
    from outside the config; nothing is imported here."""
    if not isinstance(class_path, str) or "." not in class_path:
        return  # a bare class name: jsonargparse resolves it among imported subclasses
    trees = trees_of(field)
    if class_path.startswith(trees) or trusted_class(class_path):
        return
    raise ConfigError(
        f"{field}.class_path: '{class_path}' is not imported: {field} takes a class from "
        f"{', '.join(t.rstrip('.') for t in trees)}; trust your own class with "
        f"{TRUSTED_CLASSES_VARIABLE}={class_path} (environment), or import it in your code "
        "before the CLI runs"
    )


def trusted_class(class_path: str) -> bool:
    """Trusted from outside every config: listed in ``MNEME_TRUSTED_CLASSES`` (a path or a
    package prefix), or a class its module, already imported, defines (importing it again
    runs nothing; jsonargparse still checks it is a class of the field's kind)."""
    for entry in trusted_entries():
        if class_path == entry or class_path.startswith(entry + "."):
            return True
    module_name, _, name = class_path.rpartition(".")
    module = sys.modules.get(module_name)
    defined = vars(module).get(name) if module is not None else None  # no __getattr__ runs
    return isinstance(defined, type) and defined.__module__ == module_name


def trusted_entries() -> list[str]:
    """The import paths and package prefixes ``MNEME_TRUSTED_CLASSES`` lists."""
    listed = os.environ.get(TRUSTED_CLASSES_VARIABLE, "")
    return [e.rstrip(".") for e in re.split(r"[,\s]+", listed) if e.strip(".")]


@contextlib.contextmanager
def import_policy() -> Iterator[None]:
    """While jsonargparse parses, its own import-path policy denies every module outside
    the libraries Mneme is built on, the trusted entries and the modules already imported
    (not their packages' other modules): a second guard behind :func:`check_raw_config`,
    for any way of giving a class path that the text reading does not see. jsonargparse's
    default denylist (``os``, ``subprocess``, ``builtins.exec``, ...) keeps precedence.

    jsonargparse 4.53 offers the policy only as a process-wide setting that can be
    extended, not restored (``set_parsing_settings``); it is restored here by hand
    (``jsonargparse._common.parsing_settings``), so that nothing outlives the parse."""
    from jsonargparse import _common

    settings = _common.parsing_settings
    saved = settings["import_path_verdicts"], settings["import_paths_enforced"]
    verdicts: dict[str, bool] = {"*": False}
    verdicts.update({tree.rstrip("."): True for tree in LIBRARY_TREES})
    verdicts.update({entry: True for entry in trusted_entries()})
    for name, module in list(sys.modules.items()):
        if module is not None and not hasattr(module, "__path__"):  # a module, no package
            verdicts.setdefault(name, True)
    verdicts.update({entry: False for entry, allowed in saved[0].items() if not allowed})
    settings["import_path_verdicts"], settings["import_paths_enforced"] = verdicts, True
    try:
        yield
    finally:
        settings["import_path_verdicts"], settings["import_paths_enforced"] = saved


def check_sections(content: dict, where: str) -> None:
    """Refuse a top-level section that is a scalar or a list (``trainer: 5``)."""
    for section in SECTIONS:
        value = content.get(section)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(_not_a_mapping(where, section, value))
    for section in ("model", "data"):
        value = content.get(section)
        if value is not None and not isinstance(value, dict | str):
            raise ConfigError(_not_a_mapping(where, section, value))


def _not_a_mapping(where: str, section: str, value: Any) -> str:
    return (
        f"{section}: {where} gives {type(value).__name__} {value!r:.40}, not a mapping of "
        f"{section} options; write it as `{section}:` followed by indented `key: value` "
        "lines (see configs/quickstart.yaml)"
    )


def load_yaml(path: Path, where: str) -> Any:
    """The YAML in ``path``, refusing a key given twice in one mapping (YAML would keep the
    last without a word, so a config that sets a field twice runs with one of them);
    ``None`` for text that is not YAML (jsonargparse reports it with its line)."""
    import yaml

    try:
        return yaml.load(path.read_text(), Loader=_loader())  # noqa: S506 - a SafeLoader
    except DuplicateKeyError as error:
        raise ConfigError(f"{where}: {error}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None


class DuplicateKeyError(ValueError):
    """A mapping of a YAML file gives one key twice."""


def _unique_mapping(loader: Any, node: Any, deep: bool = False) -> dict:
    if any(key_node.tag == "tag:yaml.org,2002:merge" for key_node, _ in node.value):
        return loader.construct_mapping(node, deep=deep)  # `<<:` merges override on purpose
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, str | int | float | bool) and key in seen:
            raise DuplicateKeyError(
                f"key '{key}' is given twice (lines {seen[key]} and {line}); YAML would keep "
                "only the last: keep one"
            )
        if isinstance(key, str | int | float | bool):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


@functools.cache
def _loader() -> type:
    """yaml's SafeLoader, refusing a key given twice in one mapping."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
    return UniqueKeyLoader
