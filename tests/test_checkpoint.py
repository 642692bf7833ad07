"""ExperienceCheckpoint: one file per save point, experience checkpoints kept intact."""

import os

import pytest
import torch
from lightning.pytorch import Trainer
from mneme.app import ContinualClassifier
from mneme.callbacks import ExperienceCheckpoint
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import digits_stream


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
