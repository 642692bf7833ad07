"""Prototype statistics under DDP: 2 gloo processes, each reading its shard of every
experience, end with the same buffers, equal to a single process's on the same stream."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from mneme.app import ContinualClassifier
from mneme.datamodules import ContinualDataModule

from tests.conftest import digits_stream

HEAD = {"name": "ranpac", "projection_dim": 32, "ridges": [0.1, 10.0, 1000.0], "holdout": 0.25}


class DumpHead(Callback):
    """Saves each rank's prototype-head buffers at the end of fit."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.cpu() for k, v in pl_module.prototype_head.state_dict().items()}
        state["optimizers"] = len(trainer.optimizers)
        # buffers DDP does not broadcast at each forward (they are summed, hence equal)
        state["ignored"] = sorted(getattr(trainer.strategy.model, "parameters_to_ignore", []))
        torch.save(state, f"{self.out}/rank{trainer.global_rank}.pt")


def fit(out: str, **trainer_args) -> None:
    seed_everything(0)
    model = ContinualClassifier(
        encoder="mneme_mlp", encoder_args={"hidden": [16]}, freeze_encoder=True, head=HEAD
    )
    datamodule = ContinualDataModule(**digits_stream(2), batch_size=32, eval_batch_size=100)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DumpHead(out)],
        **trainer_args,
        **datamodule.trainer_settings(),
    )
    trainer.fit(model, datamodule)


def test_summed_statistics_on_two_ranks_equal_the_single_process_ones(tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    fit(str(tmp_path / "ddp"), devices=2, strategy="ddp_fork")
    fit(str(tmp_path / "single"), devices=1)
    r0, r1, single = (
        torch.load(tmp_path / path, weights_only=True)
        for path in ("ddp/rank0.pt", "ddp/rank1.pt", "single/rank0.pt")
    )
    assert r0.pop("optimizers") == r1.pop("optimizers") == single.pop("optimizers") == 0
    assert "prototype_head.gram" in r0.pop("ignored") and r1.pop("ignored")
    single.pop("ignored")
    assert int(r0["fitted_experiences"]) == 2 and r0["counts"].sum() > 0
    assert r0["count_val"] > 0  # held-out samples of both experiences
    for name, value in single.items():
        assert torch.equal(r0[name], r1[name]), name  # one all-reduce: the same on each rank
        # the same sums, added in another order (per-rank shards)
        torch.testing.assert_close(r0[name], value, rtol=1e-6, atol=1e-6, msg=name)
    assert r0["ridge"] == single["ridge"]
