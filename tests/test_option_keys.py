"""A misspelled command-line option is reported before Lightning is imported, once a full
parse has recorded the option names (mneme.app.cli.option_keys)."""

import json
import subprocess
import sys

import pytest
from mneme.app.cli import option_keys
from mneme.app.cli.option_keys import first_unknown_option, unknown_key
from mneme.app.cli.option_keys import option_keys as keys_of
from mneme.app.cli.parser import build_cli
from mneme.app.core.errors import ConfigError

from tests.test_cli import QUICKSTART

KNOWN = ["model", "data.benchmark_args", "data.epochs_per_experience", "trainer.max_epochs"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "mneme" / "options"


def test_only_a_key_no_option_can_take_is_unknown():
    assert unknown_key("data.epochs_per_experiance", KNOWN)
    assert unknown_key("lr", KNOWN)
    # under a class-typed or mapping option, or a whole section: the full parser decides
    assert not unknown_key("model.init_args.lr", KNOWN)
    assert not unknown_key("model.lr", KNOWN)
    assert not unknown_key("data.benchmark_args.n_experiences", KNOWN)
    assert not unknown_key("trainer", KNOWN)
    assert not unknown_key("data.epochs_per_experience", KNOWN)


def test_the_keys_of_a_command_line_in_each_spelling():
    argv = [
        "--config",
        "x.yaml",
        "--a.b",
        "1",
        "--c.d=2",
        "--trainer.callbacks+=X",
        "--print_config",
    ]
    assert keys_of(argv) == ["a.b", "c.d", "trainer.callbacks"]


def test_a_full_parse_records_its_subcommands_option_names(cache, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'data.epochs_per_experience'"):
        build_cli(["fit", "--config", str(QUICKSTART), "--data.epochs_per_experiance", "3"])
    (record,) = cache.glob("*.json")
    fit = json.loads(record.read_text())["fit"]
    assert "data.epochs_per_experience" in fit and "trainer.max_epochs" in fit
    assert first_unknown_option("fit", ["--data.epochs_per_experiance", "3"]) == (
        "data.epochs_per_experiance",
        fit,
    )
    assert first_unknown_option("fit", ["--data.epochs_per_experience", "3"]) is None
    assert first_unknown_option("test", ["--data.epochs_per_experiance", "3"]) is None


def test_a_record_of_other_sources_is_not_used(cache, monkeypatch):
    option_keys.record("fit", KNOWN)
    assert first_unknown_option("fit", ["--lr", "1"]) == ("lr", sorted(KNOWN))
    monkeypatch.setattr(option_keys, "fingerprint", lambda: "another-version")
    assert first_unknown_option("fit", ["--lr", "1"]) is None


def test_the_typo_is_reported_without_importing_lightning(cache, tmp_path):
    option_keys.record("fit", KNOWN)
    probe = (
        "import sys\n"
        "from mneme.app.cli.main import main\n"
        "try:\n"
        f"    main(['fit', '--config', {str(QUICKSTART)!r}, '--data.epochs_per_experiance', '3'])\n"
        "except SystemExit as exit_:\n"
        "    print(exit_.code)\n"
        "heavy = ('torch', 'lightning', 'avalanche', 'timm')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {"XDG_CACHE_HOME": str(cache.parents[1]), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.stdout.splitlines() == [
        "mneme: error: data.epochs_per_experiance: unknown option; "
        "did you mean 'data.epochs_per_experience'?",
        "[]",
    ], out.stderr
