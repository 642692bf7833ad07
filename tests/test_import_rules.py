"""The import rules `lint-imports` cannot express: no private name crosses a file, and every
part of the package sits in a layer of the contracts in ``pyproject.toml`` (so that a new
subpackage cannot slip past them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package an install maps it to (pyproject's [tool.setuptools.package-dir]).
FOLDERS = {"app": "mneme.app", "callbacks": "mneme.callbacks", "datamodules": "mneme.datamodules"}


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each private name of a ``mneme`` module that ``source`` imports
    (``from mneme.x import _name``) or reads from an imported ``mneme`` module
    (``import mneme.x as m; m._name``)."""
    tree = ast.parse(source)
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mneme"):
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if _private(a.name)]  # fmt: skip
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("mneme") and a.asname}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_the_check_sees_both_forms_of_a_private_import():
    source = (
        "from mneme.app.x import _a, b\nimport mneme.app.y as y\ny._c()\nfrom os import _exit\n"
    )
    assert private_imports(source) == [(1, "mneme.app.x._a"), (3, "y._c")]


def test_no_private_name_is_imported_across_files():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in _sources(*FOLDERS, "benchmarks")
        for line, what in private_imports(path.read_text())
    ]
    assert not offenders, "private names imported from another file (make them public):\n" + (
        "\n".join(offenders)
    )


def _layered_modules() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = set()
    for contract in config["contracts"]:
        for layer in contract.get("layers", []):
            for part in layer.replace("|", ":").split(":"):
                named.add(part.strip().strip("()"))
    return named


def _children(folder: str, package: str) -> list[str]:
    """The modules and subpackages right under ``folder`` (``__init__`` left out)."""
    base = ROOT / folder
    names = [p.stem for p in base.glob("*.py") if p.stem != "__init__"]
    names += [p.name for p in base.iterdir() if (p / "__init__.py").is_file()]
    return sorted(f"{package}.{name}" for name in names)


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_every_part_of_the_package_has_a_layer(folder):
    named = _layered_modules()
    unplaced = []
    for child in _children(folder, FOLDERS[folder]):
        if child in named:
            continue
        sub = ROOT / folder / child.split(".")[-1]
        grandchildren = _children(str(sub.relative_to(ROOT)), child) if sub.is_dir() else []
        if not grandchildren or not all(g in named for g in grandchildren):
            unplaced.append(child)
    assert not unplaced, f"not in any layer of [tool.importlinter] (pyproject.toml): {unplaced}"
