"""``cpu_threads``: the run's torch CPU thread count (measured default: one thread for a
model under 2M parameters, every usable core above, with the passive wait policy)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mneme.app.cli.main import main
from mneme.app.cli.parser import build_cli
from mneme.app.core import threads as cpu_threads
from mneme.app.core.threads import AUTO_CPU_THREADS, AUTO_PARALLEL_PARAMETERS, auto_cpu_threads

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


def test_auto_is_every_usable_core_only_for_a_large_model_with_the_passive_wait_policy():
    cores = len(os.sched_getaffinity(0))
    assert auto_cpu_threads(True, AUTO_PARALLEL_PARAMETERS) == cores
    assert auto_cpu_threads(True, AUTO_PARALLEL_PARAMETERS - 1) == AUTO_CPU_THREADS == 1
    assert auto_cpu_threads(False, 10 * AUTO_PARALLEL_PARAMETERS) == 1
    # two DDP ranks on this machine share its cores
    assert auto_cpu_threads(True, AUTO_PARALLEL_PARAMETERS, processes=2) == max(1, cores // 2)


@pytest.mark.parametrize(("hidden", "large"), [("[256, 256]", False), ("[2048, 1024]", True)])
def test_auto_counts_the_built_models_parameters(monkeypatch, tmp_path, hidden, large):
    """The quickstart's MLP (85K parameters) trains on one thread; the same config with a
    2.2M-parameter encoder on every usable core (the passive policy as `mneme` sets it).
    The encoder is built in the module's setup: the count is taken when training starts."""
    from lightning.pytorch import Callback

    monkeypatch.setattr(cpu_threads, "_PASSIVE_WAIT", True)
    seen = {}

    class Seen(Exception):
        pass

    class Record(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["threads"] = torch.get_num_threads()
            seen["parameters"] = cpu_threads.parameter_count(pl_module)
            raise Seen  # nothing to train for

    torch.set_num_threads(3)
    args = [*CONFIG, "--model.init_args.encoder_args.hidden", hidden]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    cli = build_cli(args, run=False, extra_callbacks=[Record()])
    assert torch.get_num_threads() == 1  # while the model and the stream are built
    with pytest.raises(Seen):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert (seen["parameters"] >= AUTO_PARALLEL_PARAMETERS) == large
    assert seen["threads"] == (len(os.sched_getaffinity(0)) if large else 1)
