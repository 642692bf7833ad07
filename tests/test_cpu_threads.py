"""``cpu_threads``: the run's torch CPU thread count (measured default: one thread)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mneme.app.cli import AUTO_CPU_THREADS, auto_cpu_threads, build_cli, main

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
CONFIG = ["--config", str(QUICKSTART), "--trainer.logger", "false"]


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("setting", "expected"), [("auto", AUTO_CPU_THREADS), ("2", 2)])
def test_the_setting_decides_torch_threads(setting, expected):
    torch.set_num_threads(3)
    build_cli([*CONFIG, "--cpu_threads", setting], run=False)
    assert torch.get_num_threads() == expected


def test_zero_and_a_users_omp_num_threads_leave_torch_alone(monkeypatch):
    torch.set_num_threads(3)
    build_cli([*CONFIG, "--cpu_threads", "0"], run=False)
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    build_cli([*CONFIG], run=False)
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("setting", ["-1", "many"])
def test_a_bad_setting_is_one_line(capsys, setting):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *CONFIG, "--cpu_threads", setting])
    message = str(exit_info.value.code)
    assert "cpu_threads" in message and "\n" not in message.strip()


def test_auto_is_every_usable_core_only_with_the_passive_wait_policy():
    assert auto_cpu_threads(passive_wait=True) == len(os.sched_getaffinity(0))
    assert auto_cpu_threads(passive_wait=False) == AUTO_CPU_THREADS == 1
