"""A new strategy and a new modality are each one file, with no edit elsewhere: this file
adds a small DER-like strategy (replayed logits distilled) and a test encoder type."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from mneme.app import ContinualClassifier, ContrastiveAligner
from mneme.app.core.protocols import Classifier, StrategyHost, require
from mneme.app.nn.encoder_registry import encoder_type
from mneme.callbacks import ContinualMetrics, ExperienceCallback, FeatureDistillation, LwF, Replay
from mneme.callbacks.strategies.buffer_policies import buffer_policy
from mneme.datamodules import ConfigError, ContinualDataModule
from torch import nn

from tests.conftest import digits_stream


class LogitReplay(ExperienceCallback):
    """DER-like: keep (input, logits) of past experiences; match the logits when replayed."""

    def __init__(self, size: int = 64, alpha: float = 0.5) -> None:
        self.size, self.alpha = size, alpha
        self.inputs = self.logits = None
        self.calls = 0
        self._term = None

    def setup(self, trainer, pl_module, stage):
        require(pl_module, StrategyHost, "LogitReplay")
        self._term = pl_module.add_loss_term("der", self.penalty)

    def on_fit_start(self, trainer, pl_module):
        require(pl_module, Classifier, "LogitReplay")

    def teardown(self, trainer, pl_module, stage):
        pl_module.remove_loss_term(self._term)

    def penalty(self, batch, outputs):
        self.calls += 1
        if self.inputs is None:
            return outputs["logits"].new_zeros(())
        module = self._module
        return self.alpha * F.mse_loss(module.head(module.encoder(self.inputs)), self.logits)

    @torch.no_grad()
    def on_experience_end(self, trainer, pl_module, experience):
        self._module = pl_module
        x = trainer.datamodule.train_experiences[experience].tensors["image"][: self.size]
        self.inputs, self.logits = x, pl_module.head(pl_module.encoder(x))


def trainer_for(datamodule, *callbacks):
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **datamodule.trainer_settings(),
    )


def test_a_strategy_in_one_file_runs_and_is_removed_at_teardown():
    datamodule = ContinualDataModule(**digits_stream(2), epochs_per_experience=1)
    model, der = ContinualClassifier(encoder_args={"hidden": [16]}), LogitReplay()
    trainer_for(datamodule, der).fit(model, datamodule)
    assert der.calls > 0 and der.inputs is not None
    assert model.loss_terms == {}  # removed: a second fit without it does not apply it
    calls = der.calls
    trainer_for(datamodule).fit(model, datamodule)
    assert der.calls == calls


@encoder_type("flat_test")
class FlatEncoder(nn.Module):
    """A test modality: flatten any sample, then one linear layer."""

    def __init__(self, input_shape, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(width))
        self.out_dim = width

    def forward(self, x):
        return self.net(x.float())


def test_a_modality_in_one_file_is_named_by_type():
    datamodule = ContinualDataModule(
        "mneme.datamodules.SplitCaptionedDigits",
        {"n_experiences": 2},
        epochs_per_experience=1,
    )
    model = ContrastiveAligner(encoders={"image": {"type": "flat_test"}, "text": {}}, embed_dim=8)
    metrics = ContinualMetrics(print_table=False)
    trainer_for(datamodule, metrics).fit(model, datamodule)
    assert isinstance(model.encoders["image"].backbone, FlatEncoder)
    assert len(metrics.rows) == 2


@pytest.mark.parametrize(
    "callback, module, lacks",
    [
        (LwF(), lambda: ContrastiveAligner(), "num_heads"),
        (FeatureDistillation(), lambda: ContinualClassifier(), "embed"),
    ],
)
def test_a_strategy_on_a_module_it_cannot_serve_fails_before_training(callback, module, lacks):
    stream = (
        {"benchmark": "mneme.datamodules.SplitCaptionedDigits", "benchmark_args": {}}
        if lacks == "num_heads"
        else digits_stream(2)
    )
    sample_keys = ["image", "label", "text", "task"] if lacks == "num_heads" else None
    datamodule = ContinualDataModule(
        **stream, epochs_per_experience=1, **({"sample_keys": sample_keys} if sample_keys else {})
    )
    trainer = trainer_for(datamodule, callback)
    with pytest.raises(ConfigError, match=f"{type(callback).__name__}.*lacks.*{lacks}"):
        trainer.fit(module(), datamodule)
    assert trainer.global_step == 0


@buffer_policy("first_seen_test")
def first_seen(weights, labels, size):
    """A test policy: keep the earliest candidates offered (new ones come first)."""
    return torch.arange(len(weights) - min(size, len(weights)), len(weights))


def test_a_buffer_policy_in_one_file_is_named_by_replay():
    replay = Replay(buffer_size=5, policy="first_seen_test")
    uid = torch.arange(20)
    replay.update({"uid": uid[:10], "label": uid[:10] % 2}, 0)
    replay.update({"uid": uid[10:], "label": uid[10:] % 2}, 1)
    assert sorted(replay.buffer["uid"].tolist()) == [5, 6, 7, 8, 9]
    with pytest.raises(ConfigError, match="first_seen_test"):
        Replay(policy="no_such_policy")
