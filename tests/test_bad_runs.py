"""Runs that do not finish, or would share a folder: a process of its own where a signal
ends the run, the CLI's mechanism directly otherwise (a prefix run in this process).

An interrupted run must exit non-zero, say in one line how to resume, and mark its
``continual_metrics.json`` incomplete; two runs on one logs folder never share a version.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from mneme.app import ContinualClassifier
from mneme.app.cli.messages import summarize_library_error
from mneme.app.cli.run_folders import CLAIMED, claim_log_version, release_claims
from mneme.callbacks import FiniteLossGuard
from mneme.callbacks.runtime.finite_loss import NonFiniteDataError
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import digits_stream, mneme_in_fork, mneme_in_process
from tests.test_bad_inputs import QUICKSTART


class SignalAt(Callback):
    """Sends ``signal`` to its own process at the first batch of ``epoch``."""

    def __init__(self, epoch: int, signal: str = "SIGTERM") -> None:
        self.epoch, self.signal = epoch, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            os.kill(os.getpid(), getattr(signal, self.signal))


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_an_interrupted_run_fails_says_how_to_resume_and_is_marked_incomplete(
    tmp_path, name, status
):
    args = ["fit", "--config", QUICKSTART, "--trainer.callbacks", "[]",
            "--data.epochs_per_experience", "1",
            "--trainer.callbacks+=tests.test_bad_runs.SignalAt",
            "--trainer.callbacks.init_args.epoch", "2",
            "--trainer.callbacks.init_args.signal", name]  # fmt: skip
    result = mneme_in_fork(args, tmp_path)
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    log_dir = tmp_path / "logs" / "quickstart" / "version_0"
    assert last.startswith(f"mneme: error: fit interrupted by {name}"), last
    assert f"--ckpt_path {log_dir.relative_to(tmp_path)}/checkpoints/last.ckpt" in last, last
    metrics = json.loads((log_dir / "continual_metrics.json").read_text())
    assert metrics["complete"] is False and metrics["stopped_by"] == name
    assert metrics["experiences_done"] == 2 and metrics["num_experiences"] == 5
    assert len(metrics["accuracy_matrix"]) == 2


def test_concurrent_runs_claim_distinct_versions(tmp_path):
    """Eight runs starting together on one logs folder: each claims a version of its own."""
    configs = [{"logger": {"init_args": {"save_dir": str(tmp_path), "name": "run",
                                         "version": None}}} for _ in range(8)]  # fmt: skip
    start = threading.Barrier(len(configs))

    def claim(config):
        start.wait()
        claim_log_version(config)

    threads = [threading.Thread(target=claim, args=(c,)) for c in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    versions = sorted(c["logger"]["init_args"]["version"] for c in configs)
    assert versions == list(range(8))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        f"version_{v}" for v in range(8)
    ]
    release_claims()  # empty claims of runs that never wrote are removed
    assert not list((tmp_path / "run").iterdir()) and not CLAIMED


def test_an_existing_version_is_refused(tmp_path):
    (tmp_path / "run" / "version_3").mkdir(parents=True)
    config = {"logger": {"init_args": {"save_dir": str(tmp_path), "name": "run", "version": 3}}}
    with pytest.raises(ConfigError, match="trainer.logger.init_args.version"):
        claim_log_version(config)


def test_disk_full_names_the_folder_not_a_temp_file():
    error = OSError(errno.ENOSPC, "No space left on device", "/data/logs/run/events.out")
    summary = summarize_library_error(error)
    assert "/data/logs/run/events.out" in summary and "save_dir" in summary


class Poison(Callback):
    """Puts a NaN into one input of the third batch (runs before the guard)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            batch["image"].view(-1)[0] = float("nan")


def guarded_fit(tmp_path, *callbacks, lr: float = 0.01):
    datamodule = ContinualDataModule(**digits_stream(2), epochs_per_experience=1)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[*callbacks, FiniteLossGuard()],
        **datamodule.trainer_settings(),
    )  # fmt: skip
    optimizer = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    module = ContinualClassifier(encoder_args={"hidden": [16]}, optimizer=optimizer)
    trainer.fit(module, datamodule)


def test_the_guard_blames_non_finite_data_not_training(tmp_path):
    with pytest.raises(NonFiniteDataError, match=r"data: training batch 2 .* in image"):
        guarded_fit(tmp_path, Poison())


def test_the_guard_blames_training_on_finite_data(tmp_path):
    from mneme.callbacks import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="on finite data") as raised:
        guarded_fit(tmp_path, lr=1e12)
    assert not isinstance(raised.value, NonFiniteDataError)
    said = str(raised.value)  # a checkpoint named as good was followed by a finite step
    assert any(t in said for t in ("No checkpoint was saved yet", "Last good", "No good"))


def test_a_prefix_run_is_reported_incomplete(tmp_path):
    result = mneme_in_process(["fit", "--config", QUICKSTART, "--trainer.callbacks", "[]",
                               "--data.epochs_per_experience", "1", "--trainer.max_epochs", "2"],
                              tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Incomplete: trained 2 of 5 experiences" in result.stdout
    log_dir = next((tmp_path / "logs" / "quickstart").iterdir())
    metrics = json.loads((Path(log_dir) / "continual_metrics.json").read_text())
    assert metrics["complete"] is False and metrics["experiences_done"] == 2
