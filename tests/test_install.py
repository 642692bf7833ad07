"""The install claims one import name, ``mneme``, and the CLI answers without heavy imports."""

import subprocess
import sys
from pathlib import Path


def test_install_claims_no_generic_top_level_name(tmp_path):
    # -I: ignore the working directory and PYTHONPATH, as a user's own project would. The
    # packages are found (not imported: Lightning's import would cost this fresh process
    # ~12 CPU seconds; every other test imports them) at the checkout's folders.
    probe = (
        "import importlib.util as u; "
        "print([u.find_spec(f'mneme.{n}').origin for n in ('app', 'callbacks', 'datamodules')]); "
        "print([n for n in ('app', 'callbacks', 'datamodules') if u.find_spec(n)])"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    origins, generic = out.stdout.strip().splitlines()
    root = Path(__file__).resolve().parents[1]
    assert origins == str(
        [str(root / n / "__init__.py") for n in ("app", "callbacks", "datamodules")]
    )
    assert generic == "[]"


def test_help_and_errors_module_import_no_avalanche(tmp_path):
    probe = (
        "import sys; import mneme.app.cli.main, mneme.app.core.errors, mneme.app.core.schedule; "
        "print(sorted(m for m in ('avalanche', 'lightning', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
