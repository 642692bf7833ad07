"""A run without a logger writes its config.yaml into the working folder: a second run there
is refused in one line, and the earlier run's file is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from mneme.app.cli.main import main

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def test_an_earlier_runs_config_is_kept_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "config.yaml"
    earlier.write_text("# an earlier run's config\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--trainer.logger", "false"])
    message = str(exit_info.value.code)
    assert message.startswith("mneme: error: trainer.logger:") and "\n" not in message
    assert str(earlier) in message
    assert earlier.read_text() == "# an earlier run's config\n"
