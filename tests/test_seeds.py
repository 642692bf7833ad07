"""The run's seed decides initialisation, data order and strategy draws; the stream's class
order keeps its own seed; one seed repeats bit for bit."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, seed_everything
from mneme.app import ContinualClassifier
from mneme.callbacks import Replay
from mneme.datamodules import ContinualDataModule

from tests.conftest import digits_stream, quiet_trainer


class FirstBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.labels = batch["label"][:16].clone()


def run(seed: int) -> dict:
    seed_everything(seed)
    datamodule = ContinualDataModule(**digits_stream(2), batch_size=32)
    replay, first = Replay(buffer_size=40), FirstBatch()
    trainer = quiet_trainer(datamodule, None, [replay, first])
    model = ContinualClassifier(encoder="mneme_mlp")
    trainer.fit(model, datamodule)
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "buffer": replay.buffer["label"].clone(),
        "first_batch": first.labels,
        "classes": [e.classes for e in datamodule.train_experiences],
    }


def test_two_seeds_differ_and_one_seed_repeats_bit_identically():
    a, again, b = run(0), run(0), run(12345)
    for key, value in a["weights"].items():
        assert torch.equal(value, again["weights"][key]), key
    assert torch.equal(a["buffer"], again["buffer"])
    assert not torch.equal(a["weights"]["head.weight"], b["weights"]["head.weight"])
    assert not torch.equal(a["first_batch"], b["first_batch"])  # the data order follows it
    assert not torch.equal(a["buffer"], b["buffer"])  # and so do Replay's draws
    assert a["classes"] == b["classes"]  # the class order keeps benchmark_args.seed


def test_building_a_stream_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    ContinualDataModule(**digits_stream(5, seed=3)).train_experiences  # noqa: B018
    assert torch.equal(torch.rand(3), expected)
