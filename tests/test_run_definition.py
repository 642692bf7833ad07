"""A resume continues the checkpoint's run: another stream, class order, schedule or
strategy set is refused in one line naming both values, unless explicitly allowed."""

from __future__ import annotations

import pytest
import torch
from mneme.app import ContinualClassifier
from mneme.callbacks import EWC, ExperienceCallback, Replay
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import digits_stream, quiet_trainer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    datamodule = ContinualDataModule(**digits_stream(2), epochs_per_experience=1)
    trainer = quiet_trainer(datamodule, tmp_path, [Replay(buffer_size=20)])
    trainer.fit(ContinualClassifier(encoder="mneme_mlp"), datamodule)
    path = tmp_path / "done.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["mneme_run"]
    assert saved["strategies"] == [Replay(buffer_size=20).state_key]
    assert saved["epochs_per_experience"] == 1 and len(saved["class_order"]) == 2
    return path


def resume(path, tmp_path, callbacks, **data):
    args = {**digits_stream(2), "epochs_per_experience": 1, **data}
    datamodule = ContinualDataModule(**args)
    trainer = quiet_trainer(datamodule, tmp_path, callbacks)
    trainer.fit(ContinualClassifier(encoder="mneme_mlp"), datamodule, ckpt_path=path)


@pytest.mark.parametrize(
    ("callbacks", "data", "expected"),
    [
        ([], {}, "trainer.callbacks"),  # the strategy dropped
        ([Replay(buffer_size=20), EWC()], {}, "trainer.callbacks"),  # one added
        ([Replay(buffer_size=20)], {"benchmark_args": {"n_experiences": 2, "seed": 5}}, "seed"),
    ],
    ids=["strategy_dropped", "strategy_added", "class_order"],
)
def test_a_resume_that_changes_the_run_is_refused(checkpoint, tmp_path, callbacks, data, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        resume(checkpoint, tmp_path, callbacks, **data)
    assert "allow_resume_changes" in str(error.value) and "\n" not in str(error.value)


class Dashboard(ExperienceCallback):
    affects_training = False  # as EmbeddingProjector


def test_a_listed_change_and_a_dashboard_are_accepted(checkpoint, tmp_path):
    replay = [Replay(buffer_size=20), Dashboard()]
    resume(checkpoint, tmp_path, replay)  # a dashboard does not change the run
    resume(checkpoint, tmp_path, [], allow_resume_changes=["strategies"])
    with pytest.raises(ConfigError, match="data.allow_resume_changes"):
        resume(checkpoint, tmp_path, [], allow_resume_changes=["everything"])
