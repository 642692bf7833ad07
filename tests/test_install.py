"""The install claims one import name, ``mneme``, and the CLI answers without heavy imports."""

import subprocess
import sys


def test_install_claims_no_generic_top_level_name(tmp_path):
    # -I: ignore the working directory and PYTHONPATH, as a user's own project would.
    probe = (
        "import importlib.util as u, mneme.app, mneme.callbacks, mneme.datamodules; "
        "print([n for n in ('app', 'callbacks', 'datamodules') if u.find_spec(n)])"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_and_errors_module_import_no_avalanche(tmp_path):
    probe = (
        "import sys; import mneme.app.cli, mneme.datamodules.errors, mneme.datamodules.schedule; "
        "print(sorted(m for m in ('avalanche', 'lightning', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
