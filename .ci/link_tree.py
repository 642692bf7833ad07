"""Build ``build/typecheck/mneme/{app,callbacks,datamodules}``: links to the repository's
folders under the package names an install gives them, for static tools.

The editable install maps ``mneme.app`` onto ``app/`` with setuptools' import-hook finder,
which pyright, basedpyright and mypy do not run. With this tree on their search path
(``extraPaths`` in ``pyproject.toml``'s ``[tool.pyright]``) they resolve every ``mneme.*``
import to the file in ``app/``, ``callbacks/``, ``datamodules/``; the links are folders, so
files added later are seen without running this again. Run by ``.ci/run``; run it once after
a clone for an editor's go-to-definition.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def main() -> int:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = config["tool"]["setuptools"]["package-dir"]  # {"mneme.app": "app", ...}
    for package, folder in package_dir.items():
        link = TREE.joinpath(*package.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(ROOT / folder, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    print(f"{TREE.relative_to(ROOT)}: {', '.join(sorted(package_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
