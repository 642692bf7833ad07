"""A run killed with SIGKILL and resumed from last.ckpt ends with the same accuracy matrix."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CONFIG = ROOT / "configs" / "quickstart.yaml"
STRATEGIES = {"naive": []}


def fit(cwd: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    code = "import sys; from app.cli import main; main(sys.argv[1:])"
    args = ["fit", "--config", str(CONFIG), "--trainer.deterministic", "true",
            "--trainer.logger.init_args.name", name,
            "--data.epochs_per_experience", "2"]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", code, *args, *extra],
        cwd=cwd, env=env, capture_output=True, text=True,
    )  # fmt: skip


def matrix_of(log_dir: Path) -> list[float]:
    """The accuracy matrix, flattened row by row."""
    rows = json.loads((log_dir / "continual_metrics.json").read_text())["accuracy_matrix"]
    assert len(rows) == 5
    return [a for row in rows for a in row]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


def killed_and_resumed(workdir: Path, name: str, strategy: list[str], *kill: str) -> Path:
    killer = ["--trainer.callbacks+=tests.killer.KillAt", *kill]
    killed = fit(workdir, name, *strategy, *killer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    first = workdir / "logs" / name / "version_0"
    resumed = fit(workdir, name, *strategy, "--ckpt_path", str(first / "checkpoints" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return workdir / "logs" / name / "version_1"


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sigkill_then_resume_gives_the_same_matrix(workdir, strategy):
    args = STRATEGIES[strategy]
    reference = fit(workdir, f"{strategy}_ref", *args)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = matrix_of(workdir / "logs" / f"{strategy}_ref" / "version_0")
    # killed inside experience 2 (epoch 5, batch 3): resumes from the end of epoch 4
    log_dir = killed_and_resumed(
        workdir, strategy, args, "--trainer.callbacks.init_args.epoch", "5",
        "--trainer.callbacks.init_args.batch", "3",
    )  # fmt: skip
    assert matrix_of(log_dir) == pytest.approx(expected, abs=1e-6)
