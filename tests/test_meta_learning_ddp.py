"""MetaLearner under DDP: 2 gloo processes, each meta-training on its own half of every
meta-batch's tasks, end with the parameters of one process trained on all the tasks (the
meta-gradients are all-reduced as a mean over the union), and their per-episode test
accuracies gather to the single process's."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, seed_everything
from mneme.app.models.fewshot.maml import MetaLearner

from tests.test_meta_learning import Batches, SyntheticEpisodes, meta_batch, trainer


class ShardedEpisodes(SyntheticEpisodes):
    """Test episodes sharded across ranks too, as the episodic datamodule shards them."""

    def test_dataloader(self):
        return [
            Batches(self, 1, lambda e, i, k=k: self._shard(meta_batch(4, 77 + i, k=k, **self.kw)))
            for _, k in self.eval_settings
        ]


class Dump(Callback):
    def __init__(self, out) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "fit")

    def _save(self, trainer, pl_module, stage: str) -> None:
        state = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()}
        torch.save(state, self.out / f"{stage}{trainer.global_rank}.pt")

    def on_test_end(self, trainer, pl_module) -> None:
        values = [m.compute().cpu() for m in pl_module.episode_accuracies]
        torch.save(values, self.out / f"test{trainer.global_rank}.pt")


def run(out, algorithm: str, **trainer_args) -> None:
    out.mkdir()
    seed_everything(0)
    model = MetaLearner(
        encoder="mneme_cnn",
        encoder_args={"widths": [4, 4]},
        algorithm=algorithm,
        inner_steps=2,
        inner_lr=0.3,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        n_way=3,
        input_shape=(1, 8, 8),  # built here, not in the children's setup (ddp_fork)
    )
    datamodule = ShardedEpisodes(tasks=4, batches=2, shape=(1, 8, 8))
    fit = trainer(max_epochs=1, callbacks=[Dump(out)], **trainer_args)
    fit.fit(model, datamodule)
    # a ddp_fork fit trains in the children: evaluate the weights rank 0 ended with
    trained = torch.load(out / "fit0.pt", weights_only=True)
    loaded = model.load_state_dict(trained, strict=False)
    assert not loaded.unexpected_keys  # missing: batch-norm buffers, unused (transductive)
    trainer(callbacks=[Dump(out)], **trainer_args).test(model, datamodule, verbose=False)


def test_two_ranks_on_halves_of_the_tasks_equal_one_process_on_all(tmp_path):
    run(tmp_path / "ddp", "maml", devices=2, strategy="ddp_fork")
    run(tmp_path / "single", "maml", devices=1)
    load = lambda path: torch.load(tmp_path / path, weights_only=True)  # noqa: E731
    r0, r1, single = load("ddp/fit0.pt"), load("ddp/fit1.pt"), load("single/fit0.pt")
    start = load("single/start0.pt")
    assert set(single) == set(start) and any(not torch.equal(start[n], single[n]) for n in start)
    for name, value in single.items():
        assert torch.equal(r0[name], r1[name]), name  # one all-reduce: the same on each rank
        # the same mean meta-gradient, summed in another order (per-rank partial sums)
        torch.testing.assert_close(r0[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # per-episode accuracies: each rank scored its shard; the metric gathers the union
    (t0, t1, ts) = load("ddp/test0.pt"), load("ddp/test1.pt"), load("single/test0.pt")
    for a, b, s in zip(t0, t1, ts, strict=True):
        assert len(a) == len(s) == 4
        assert torch.equal(a, b)
        torch.testing.assert_close(a.sort().values, s.sort().values)
