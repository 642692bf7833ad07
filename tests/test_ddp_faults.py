"""DDP failures (issue 25): a killed or stopped rank ends every process of the run, each
surviving one with one ``mneme: error:`` line, within ``MNEME_DDP_TIMEOUT`` (+ a few
seconds); a mixture-of-experts head under plain ``ddp`` trains (the CLI turns on DDP's
unused-parameter detection). Two gloo processes on CPU per run, through the console script
(the launcher re-runs it per rank): slow, so ``pytest -m slow``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from lightning.pytorch import Callback

from tests.conftest import ROOT

HOW = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


class HaltRank(Callback):
    """SIGKILLs or SIGSTOPs the process of ``rank`` when epoch ``epoch`` starts."""

    def __init__(self, rank: int = 1, epoch: int = 1, how: str = "kill") -> None:
        if how not in HOW:
            raise ValueError(f"how: one of {sorted(HOW)}")
        self.rank, self.epoch, self.how = rank, epoch, how

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if (trainer.global_rank, trainer.current_epoch) == (self.rank, self.epoch):
            os.kill(os.getpid(), HOW[self.how])


def ddp_run(cwd: Path, how: str, timeout_s: int) -> subprocess.CompletedProcess:
    """A 2-experience quickstart with a MoE head under plain ``ddp`` on 2 CPU processes,
    rank 1 halted (``how``) when experience 1 starts."""
    return mneme_ddp(
        cwd,
        "--model.init_args.head", "{name: moe, num_experts: 4, top_k: 1, hidden: 16}",
        "--data.benchmark_args.n_experiences", "2",
        "--trainer.callbacks+=tests.test_ddp_faults.HaltRank",
        "--trainer.callbacks.init_args.how", how,
        timeout_s=timeout_s,
    )  # fmt: skip


def mneme_ddp(cwd: Path, *extra: str, timeout_s: int = 600) -> subprocess.CompletedProcess:
    """``mneme fit`` of the quickstart (an MLP of 32, one epoch per experience) under plain
    ``ddp`` on 2 CPU processes, with ``extra`` arguments, through the console script."""
    args = [
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--trainer.callbacks", "[]", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--model.init_args.encoder_args", "{hidden: [32]}", "--data.epochs_per_experience", "1",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    env["MNEME_DDP_TIMEOUT"] = str(timeout_s)
    env.pop("MNEME_DEBUG", None)
    mneme = Path(sys.executable).parent / "mneme"  # the console script
    return subprocess.run(
        [str(mneme), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def processes_in(cwd: Path) -> list[psutil.Process]:
    """Processes still running in ``cwd`` (the run's ranks and their workers)."""
    alive = []
    for process in psutil.process_iter(["cwd", "status"]):
        if process.info["cwd"] == str(cwd) and process.info["status"] != psutil.STATUS_ZOMBIE:
            alive.append(process)
    return alive


@pytest.mark.slow
def test_moe_experts_added_under_ddp_resume_to_the_same_matrix(tmp_path):
    """Experts added at experience starts are made after DDP wrapped the model: unless
    broadcast and averaged (MoEHead.average_outside_ddp) each rank trains its own copy,
    and a resume (whose DDP wraps them) differs: 0.011 in one cell before the fix."""
    import json

    grow = [
        "--model.init_args.head",
        "{name: moe, num_experts: 2, experts_per_experience: 2, top_k: 2, hidden: 16}",
    ]
    kill = [
        "--trainer.callbacks+=tests.killer.KillAt",
        "--trainer.callbacks.init_args.epoch",
        "3",
        "--trainer.callbacks.init_args.batch",
        "2",
    ]  # both ranks, inside experience 3
    name = ["--trainer.logger.init_args.name"]
    assert mneme_ddp(tmp_path, *grow, *name, "whole").returncode == 0
    assert mneme_ddp(tmp_path, *grow, *name, "cut", *kill).returncode != 0
    last = tmp_path / "logs" / "cut" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = mneme_ddp(tmp_path, *grow, *name, "cut", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def matrix(run: str) -> list[list[float]]:
        path = tmp_path / "logs" / run / "version_0" / "continual_metrics.json"
        return json.loads(path.read_text())["accuracy_matrix"]

    assert matrix("cut") == matrix("whole")


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, expected",
    [
        ("kill", "another process of this DDP run ended (killed or crashed"),
        ("stop", "did not answer for MNEME_DDP_TIMEOUT=60 s (stopped or hung)"),
    ],
)
def test_a_halted_rank_ends_the_run_with_one_line_and_no_process_left(tmp_path, how, expected):
    # 60 s: the bound also covers the start-up rendezvous, slow on a busy 2-core machine
    result = ddp_run(tmp_path, how, timeout_s=60)
    try:
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("mneme: error:")]
        assert errors and all(expected in line for line in errors), result.stderr[-3000:]
        assert "trainer.devices" in errors[0] and "--ckpt_path" in errors[0]
        # the MoE head trained experience 0 under plain ddp (unused-parameter detection on)
        assert "with unused-parameter detection" in result.stdout
        checkpoints = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints"
        assert (checkpoints / "last.ckpt").is_file()
        assert not processes_in(tmp_path)  # the stopped rank too
    finally:
        for process in processes_in(tmp_path):  # never leave one behind a failed assertion
            process.kill()


# The messages torch 2.14's gloo and Lightning 2.6 raised in these runs (fast: no processes).
OBSERVED = {
    "peer_gone": "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read "
    "error [127.0.0.1]:55183: Connection reset by peer. This is typically caused by a remote "
    "worker hanging or bugs in the application.",
    "timeout": "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:"
    "78] Timed out waiting 5000ms for recv operation to complete",
    "pair_closure": "Application timeout caused pair closure",
    "rendezvous": "The client socket has timed out after 20000ms while trying to connect to "
    "(127.0.0.1, 39049).",
    "unused_parameters": "It looks like your LightningModule has parameters that were not used "
    "in producing the loss returned by training_step. If this is intentional, you must enable "
    "the detection of unused parameters in DDP",
}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("peer_gone", "another process of this DDP run ended"),
        ("timeout", "did not answer for MNEME_DDP_TIMEOUT="),
        ("pair_closure", "did not answer for MNEME_DDP_TIMEOUT="),
        ("rendezvous", "did not answer for MNEME_DDP_TIMEOUT="),
        ("unused_parameters", "--trainer.strategy ddp_find_unused_parameters_true"),
    ],
)
def test_each_ddp_failure_is_one_line_naming_the_fix(case, expected):
    from mneme.app.cli.messages import summarize_library_error

    try:  # raised from another error, as Lightning re-raises inside its loops
        try:
            raise RuntimeError(OBSERVED[case])
        except RuntimeError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as error:
        line = summarize_library_error(error)
    assert line is not None and expected in line and "\n" not in line
    assert summarize_library_error(RuntimeError("an unrelated bug")) is None


def test_a_moe_head_gets_unused_parameter_detection_and_an_explicit_choice_is_kept():
    from mneme.app import ContinualClassifier
    from mneme.app.cli.commands import ddp_with_timeout

    moe = ContinualClassifier(head={"name": "moe", "num_experts": 2, "top_k": 1})
    assert ddp_with_timeout("ddp", moe)._ddp_kwargs["find_unused_parameters"] is True
    kept = ddp_with_timeout("ddp_find_unused_parameters_false", moe)
    assert kept._ddp_kwargs["find_unused_parameters"] is False
    plain = ddp_with_timeout("ddp", ContinualClassifier())
    assert "find_unused_parameters" not in plain._ddp_kwargs
