"""A run killed with SIGKILL and resumed from last.ckpt ends with the same accuracy matrix.

The killed run has a process of its own (forked from this one); the reference and the
resumed run run in this process (the same ``main``), except under DDP."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, mneme_in_fork, mneme_in_process

CONFIG = ROOT / "configs" / "quickstart.yaml"
STRATEGIES = {
    "naive": [],
    "ewc": [
        "--trainer.callbacks+=mneme.callbacks.EWC",
        "--trainer.callbacks.init_args.ewc_lambda",
        "100",
    ],
    "replay": [
        "--trainer.callbacks+=mneme.callbacks.Replay",
        "--trainer.callbacks.init_args.buffer_size",
        "60",
    ],
    "lwf": ["--trainer.callbacks+=mneme.callbacks.LwF"],
}
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
STRATEGIES["replay_ddp"] = [*STRATEGIES["replay"], *DDP]  # each rank's own buffer comes back
# per-sample loaders (nothing materialized): the sampler's order and the strategies' reads
STRATEGIES["replay_ewc_on_demand"] = [
    *STRATEGIES["replay"], *STRATEGIES["ewc"], "--data.materialize", "false"
]  # fmt: skip
# Where each strategy's run is killed (2 epochs per experience: boundaries end epochs 1, 3, ...):
KILL_POINTS = {
    "naive": [
        "--trainer.callbacks.init_args.epoch",
        "5",
        "--trainer.callbacks.init_args.batch",
        "3",
    ],
    # after the experience-end work (Fisher), before the boundary checkpoint is written
    "ewc": [
        "--trainer.callbacks.init_args.epoch",
        "3",
        "--trainer.callbacks.init_args.hook",
        "train_epoch_end",
    ],
    # during the validation that fills row 2 of the matrix
    "replay": [
        "--trainer.callbacks.init_args.epoch",
        "5",
        "--trainer.callbacks.init_args.hook",
        "validation_batch",
    ],
    # the first step of a new experience (right after the teacher snapshot)
    "lwf": ["--trainer.callbacks.init_args.epoch", "6", "--trainer.callbacks.init_args.batch", "0"],
}
KILL_POINTS["replay_ddp"] = KILL_POINTS["replay"]
KILL_POINTS["replay_ewc_on_demand"] = [
    "--trainer.callbacks.init_args.epoch", "4", "--trainer.callbacks.init_args.batch", "2"
]  # fmt: skip


def fit(cwd: Path, name: str, *extra: str, killed: bool = False) -> subprocess.CompletedProcess:
    """A quickstart run, in this process (``mneme_in_process``); in a process forked from
    this one if it is ``killed`` (SIGKILL ends its process: ``mneme_in_fork``); as the
    console script under DDP (the launcher re-runs the script per rank)."""
    # the quickstart's own Replay is dropped: each test names its strategy
    args = ["fit", "--config", str(CONFIG), "--trainer.callbacks", "[]",
            "--trainer.deterministic", "true",
            "--trainer.logger.init_args.name", name,
            "--data.epochs_per_experience", "2", *extra]  # fmt: skip
    if "ddp" not in extra:
        return (mneme_in_fork if killed else mneme_in_process)(args, cwd)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    env.pop("MNEME_DEBUG", None)
    mneme = Path(sys.executable).parent / "mneme"  # the console script
    return subprocess.run(
        [str(mneme), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
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
    killed = fit(workdir, name, *strategy, *killer, killed=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = workdir / "logs" / name / "version_0" / "checkpoints" / "last.ckpt"
    resume = ["--ckpt_path", str(last)] if last.exists() else []  # killed before any save
    resumed = fit(workdir, name, *strategy, *resume)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # a resume continues in the run it resumes; a run killed before any save starts anew
    return workdir / "logs" / name / ("version_0" if resume else "version_1")


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sigkill_then_resume_gives_the_same_matrix(workdir, strategy):
    args = STRATEGIES[strategy]
    reference = fit(workdir, f"{strategy}_ref", *args)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = matrix_of(workdir / "logs" / f"{strategy}_ref" / "version_0")
    log_dir = killed_and_resumed(workdir, strategy, args, *KILL_POINTS[strategy])
    assert matrix_of(log_dir) == pytest.approx(expected, abs=1e-6)


# The full sweep (issue: kill a 5-experience run at 10 points): `pytest -m slow`.
COMBINED = [*STRATEGIES["replay"], *STRATEGIES["ewc"]]
SWEEP = {
    "first_batch": ("train_batch", 0, 0),
    "inside_experience_0": ("train_batch", 0, 5),
    "after_fisher_and_buffer_update_of_experience_0": ("train_epoch_end", 1, 0),
    "validation_of_experience_0": ("validation_batch", 1, 0),
    "first_batch_of_experience_1": ("train_batch", 2, 0),
    "between_epochs_of_experience_1": ("train_epoch_end", 2, 0),
    "inside_experience_2": ("train_batch", 4, 4),
    "validation_of_experience_3": ("validation_batch", 7, 0),
    "after_fisher_and_buffer_update_of_experience_3": ("train_epoch_end", 7, 0),
    "last_epoch": ("train_batch", 9, 2),
}


@pytest.fixture(scope="module")
def combined_reference(workdir):
    result = fit(workdir, "combined_ref", *COMBINED)
    assert result.returncode == 0, result.stderr[-2000:]
    return matrix_of(workdir / "logs" / "combined_ref" / "version_0")


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(SWEEP))
def test_fault_sweep(workdir, combined_reference, point):
    hook, epoch, batch = SWEEP[point]
    kill = ["--trainer.callbacks.init_args.hook", hook, "--trainer.callbacks.init_args.epoch",
            str(epoch), "--trainer.callbacks.init_args.batch", str(batch)]  # fmt: skip
    if hook == "validation_batch":  # mid-validation: on the third test experience's loader
        kill += ["--trainer.callbacks.init_args.dataloader", "2"]
    log_dir = killed_and_resumed(workdir, f"sweep_{point}", COMBINED, *kill)
    assert matrix_of(log_dir) == pytest.approx(combined_reference, abs=1e-6)


# -- what changes training: one declaration, read by the resume guard ------------------------
def _mixup():
    from mneme.callbacks import MixUp

    return MixUp(mixup_alpha=0.2, seed=0)


def _unfreezing():
    from mneme.callbacks import ProgressiveUnfreezing

    return ProgressiveUnfreezing()


RESNET = {"encoder": "resnet10t", "encoder_args": {"channels": [8, 8, 8, 8], "stem_width": 8}}


@pytest.mark.parametrize(
    ("make", "model_args"),
    [(_mixup, {"encoder": "mneme_mlp"}), (_unfreezing, RESNET)],
    ids=["mixup", "progressive_unfreezing"],
)
def test_a_resume_that_drops_augmentation_or_unfreezing_is_refused_in_one_line(
    tmp_path, make, model_args
):
    import torch
    from mneme.app import ContinualClassifier
    from mneme.callbacks.base import affects_training
    from mneme.datamodules import ConfigError, ContinualDataModule

    from tests.conftest import digits_stream, quiet_trainer

    def run(callbacks, ckpt_path=None):
        datamodule = ContinualDataModule(**digits_stream(2), epochs_per_experience=1)
        trainer = quiet_trainer(datamodule, tmp_path, callbacks, limit_train_batches=1,
                                limit_val_batches=1)  # fmt: skip
        model = ContinualClassifier(**model_args)
        trainer.fit(model, datamodule, ckpt_path=ckpt_path)
        return trainer

    strategy = make()
    assert affects_training(strategy)  # declared by the callback itself
    trainer = run([strategy])
    trainer.save_checkpoint(tmp_path / "with.ckpt")
    saved = torch.load(tmp_path / "with.ckpt", weights_only=True)["mneme_run"]
    assert saved["strategies"] == [strategy.state_key]
    with pytest.raises(ConfigError, match=r"^ckpt_path: .*trainer.callbacks") as error:
        run([], tmp_path / "with.ckpt")
    assert strategy.state_key in str(error.value) and "\n" not in str(error.value)
