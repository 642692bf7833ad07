"""ExperienceCheckpoint: one file per save point, experience checkpoints kept intact."""

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from mneme.app import ContinualClassifier
from mneme.callbacks import ExperienceCheckpoint
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import ROOT, digits_stream, mneme_in_fork


def fit(tmp_path, **checkpoint_args) -> ExperienceCheckpoint:
    datamodule = ContinualDataModule(**digits_stream(2), epochs_per_experience=2)
    checkpoint = ExperienceCheckpoint(dirpath=str(tmp_path), **checkpoint_args)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
        **datamodule.trainer_settings(),
    )
    trainer.fit(ContinualClassifier(encoder_args={"hidden": [16]}), datamodule)
    return checkpoint


def epoch_of(path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["epoch"]


def test_last_is_a_link_to_the_newest_experience_checkpoint(tmp_path):
    checkpoint = fit(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["experience=0.ckpt", "experience=1.ckpt", "last.ckpt"]
    assert os.path.samefile(tmp_path / "last.ckpt", tmp_path / "experience=1.ckpt")
    # last.ckpt was rewritten at epoch 2 (mid-experience 1) without touching experience 0
    assert epoch_of(tmp_path / "experience=0.ckpt") == 1
    assert epoch_of(tmp_path / "experience=1.ckpt") == 3
    assert checkpoint.last_model_path == str(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("ExperienceCheckpoint")]
    assert saved["version"] == 1 and len(saved["experience_paths"]) == 2


@pytest.mark.parametrize("keep, kept", [(1, ["experience=1.ckpt"]), (0, [])])
def test_keep_experiences_bounds_the_files(tmp_path, keep, kept):
    fit(tmp_path, keep_experiences=keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == [*kept, "last.ckpt"]
    assert epoch_of(tmp_path / "last.ckpt") == 3


def test_negative_retention_is_refused():
    with pytest.raises(ConfigError, match="checkpoint.keep_experiences"):
        ExperienceCheckpoint(keep_experiences=-1)


class KillWhileCopying(Callback):
    """SIGKILLs its process halfway through the copy of the checkpoint saved at the end of
    ``epoch``: Lightning stages a checkpoint in TMPDIR and copies it into the checkpoint
    folder when that is another file system (``shutil.copyfile``)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):  # before the checkpoint callback
        if trainer.current_epoch != self.epoch:
            return

        def half_then_die(src, dst, *args, **kwargs):
            data = Path(src).read_bytes()
            with open(dst, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        shutil.copyfile = half_then_die


@pytest.mark.parametrize(
    "epochs_per_experience, written", [(2, "last.ckpt"), (1, "experience=2.ckpt")]
)
def test_a_kill_while_a_checkpoint_is_copied_from_tmpdir_leaves_a_loadable_last(
    tmp_path, epochs_per_experience, written
):
    """Killed while the epoch-2 checkpoint (``written``) is copied in from a TMPDIR on
    another file system (tmpfs): ``last.ckpt`` still loads, and holds epoch 1."""
    tmpdir = Path("/dev/shm") / f"mneme-test-{os.getpid()}-{epochs_per_experience}"
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a TMPDIR on another file system (/dev/shm)")
    tmpdir.mkdir()
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.callbacks", "[]",
            "--data.epochs_per_experience", str(epochs_per_experience),
            "--trainer.callbacks+=tests.test_checkpoint.KillWhileCopying",
            "--trainer.callbacks.init_args.epoch", "2"]  # fmt: skip
    try:
        result = mneme_in_fork(args, tmp_path, env={"TMPDIR": str(tmpdir)}, timeout=300)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    folder = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints"
    assert (folder / f"{written}.tmp").is_file()  # the cut copy, under its temporary name
    assert epoch_of(folder / "last.ckpt") == 1
    assert not (folder / "experience=2.ckpt").exists()
