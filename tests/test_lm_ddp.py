"""A language model under DDP (2 gloo processes): Replay's buffer on each rank is the one
that rank's shard gives, and EWC's Fisher over the LoRA weights is the same on both ranks and
equals the rank-by-rank reference (the mean over every rank's batches)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from mneme.callbacks.strategies.ewc import EWC
from mneme.callbacks.strategies.replay import Replay

from tests.lm_stream import make_lm, make_stream, save_tokenizer


class DumpState(Callback):
    """Each rank's Replay buffer and EWC state at the end of fit."""

    def __init__(self, out: str, replay: Replay, ewc: EWC) -> None:
        self.out, self.replay, self.ewc = out, replay, ewc

    def on_train_end(self, trainer, pl_module) -> None:
        state = {
            "buffer": {k: v.cpu() for k, v in self.replay.buffer.items()},
            "weights": self.replay.weights.cpu(),
            "names": list(self.ewc.names),
            "fishers": [f.cpu() for f in self.ewc.fishers],
            "anchors": [a.cpu() for a in self.ewc.anchors],
        }
        torch.save(state, f"{self.out}/rank{trainer.global_rank}.pt")


def test_replay_and_ewc_state_on_two_ranks_match_the_rank_by_rank_reference(tmp_path):
    tokenizer = str(save_tokenizer(tmp_path / "tokenizer"))
    replay, ewc = Replay(buffer_size=10, policy="class_balanced"), EWC(ewc_lambda=10.0)
    seed_everything(0)
    datamodule = make_stream(n_domains=2)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[replay, ewc, DumpState(str(tmp_path), replay, ewc)],
        **datamodule.trainer_settings(),
    )  # fmt: skip
    trainer.fit(make_lm(tokenizer, lr=3e-2), datamodule)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # Replay: each rank's buffer is what its shard (indices rank::2) of each domain gives.
    seed_everything(0)  # Replay's weights follow the run seed
    reference = make_stream(n_domains=2)
    for rank, state in enumerate(ranks):
        alone = Replay(buffer_size=10, policy="class_balanced")
        for k, experience in enumerate(reference.train_experiences):
            alone.update(experience, k, rank=rank, world_size=2)
        assert torch.equal(state["weights"], alone.weights)
        for key, value in alone.buffer.items():
            assert torch.equal(state["buffer"][key], value), (rank, key)
    assert not torch.equal(ranks[0]["buffer"]["input_ids"], ranks[1]["buffer"]["input_ids"])

    # EWC: only the LoRA weights, one Fisher on both ranks, the mean over all ranks' batches.
    assert ranks[0]["names"] == ranks[1]["names"] and all("lora_" in n for n in ranks[0]["names"])
    for f0, f1 in zip(ranks[0]["fishers"], ranks[1]["fishers"], strict=True):
        assert torch.equal(f0, f1)
    module = make_lm(tokenizer)
    module._build(len(module.tokenizer))
    named = dict(module.named_parameters())
    for k, experience in enumerate(reference.train_experiences):
        with torch.no_grad():  # the model as the Fisher of experience k saw it
            flat = ranks[0]["anchors"][k]
            sizes = [named[n].numel() for n in ranks[0]["names"]]
            for name, part in zip(ranks[0]["names"], flat.split(sizes), strict=True):
                named[name].copy_(part.view_as(named[name]))
        sums, batches = torch.zeros_like(flat), 0
        for rank in (0, 1):  # each rank's shard, as a process of its own would read it
            probe = EWC(ewc_lambda=10.0)
            probe._bind(module)
            fake = SimpleNamespace(
                global_rank=rank, world_size=2, datamodule=reference,
                strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
            )  # fmt: skip
            shard = len(range(rank, len(experience), 2))
            n = -(-shard // reference.batch_size)  # the shard's batches
            sums += probe.estimate_fisher(module, experience, k, fake) * n
            batches += n
        torch.testing.assert_close(ranks[0]["fishers"][k], sums / batches, rtol=1e-5, atol=1e-9)
