"""The mixture-of-experts head: load balancing, top-k routing, experts per experience with
the old ones frozen, resume, routing logs, bad inputs."""

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from mneme.app import ContinualClassifier
from mneme.app.nn.heads.moe import MoEHead, balance_loss
from mneme.app.nn.heads.registry import build_moe_head
from mneme.callbacks import ExperienceCheckpoint
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import digits_stream, quiet_trainer

GROWING = {"name": "moe", "num_experts": 2, "top_k": 1, "hidden": 16, "experts_per_experience": 2}


def classifier(head=GROWING) -> ContinualClassifier:
    return ContinualClassifier(encoder="mneme_mlp", encoder_args={"hidden": [32]}, head=head)


def stream(epochs: int = 1) -> ContinualDataModule:
    return ContinualDataModule(**digits_stream(2), epochs_per_experience=epochs, batch_size=128)


# -- the load-balancing loss ----------------------------------------------------------------
def test_balance_loss_is_one_for_uniform_routing_and_num_experts_for_one_expert():
    experts = 4
    uniform = torch.full((8, experts), 1 / experts)
    even = torch.arange(8).remainder(experts).unsqueeze(1)  # each expert 2 of 8 samples
    # hand: E * sum_i f_i P_i = 4 * 4 * (1/4 * 1/4) = 1
    assert balance_loss(uniform, even, experts).item() == pytest.approx(1.0)
    one = torch.zeros(8, experts)
    one[:, 2] = 1.0
    # hand: 4 * (f_2 = 1) * (P_2 = 1) = 4
    assert balance_loss(one, torch.full((8, 1), 2), experts).item() == pytest.approx(4.0)
    # a lopsided case by hand: f = (3/4, 1/4, 0, 0), P = mean of probs rows
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3 + [[0.1, 0.6, 0.2, 0.1]])
    chosen = torch.tensor([[0], [0], [0], [1]])
    p0, p1 = (0.7 * 3 + 0.1) / 4, (0.1 * 3 + 0.6) / 4
    assert balance_loss(probs, chosen, experts).item() == pytest.approx(4 * (0.75 * p0 + 0.25 * p1))


def test_the_head_reports_num_experts_when_the_gate_sends_everything_to_one_expert():
    torch.manual_seed(0)
    head = MoEHead(6, 3, num_experts=5, top_k=1, hidden=8)
    with torch.no_grad():
        head.gates[0].weight.zero_()
        head.gates[0].weight[3, 0] = 100.0  # feature 0 > 0 -> expert 3 overwhelmingly
    x = torch.randn(32, 6)
    x[:, 0] = x[:, 0].abs() + 1
    head(x)
    assert head.last_balance_loss.item() == pytest.approx(5.0, rel=1e-4)
    assert head.step_outputs()["moe_balance"] is head.last_balance_loss
    assert head.routing_counts.tolist() == [0, 0, 0, 32, 0]


# -- routing ----------------------------------------------------------------------------------
def test_top_k_routing_runs_each_sample_through_its_k_most_probable_experts():
    torch.manual_seed(0)
    head = MoEHead(6, 3, num_experts=5, top_k=2, hidden=8, normalize_top_k=True)
    x = torch.randn(20, 6)
    probs, chosen, weights = head.route(x)
    assert chosen.shape == (20, 2)
    assert all(len(set(row.tolist())) == 2 for row in chosen)  # k distinct experts
    assert torch.equal(chosen, probs.topk(2, dim=1).indices)
    assert torch.allclose(weights.sum(1), torch.ones(20))
    # dense reference: every expert on every sample, weighted by the renormalized top-2 gate
    dense = torch.stack([e(x) for e in head.experts], dim=1)  # (N, E, out)
    gate = torch.zeros(20, 5).scatter(1, chosen, weights)
    assert torch.allclose(head(x), (gate.unsqueeze(-1) * dense).sum(1), atol=1e-6)
    assert head.routing_counts.sum() == 0  # only a training step's step_outputs counts
    head.step_outputs()
    assert head.routing_counts.sum() == 40


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"num_experts": 2, "top_k": 3}, "model.head.top_k"),
        ({"num_experts": 0}, "model.head.num_experts"),
        ({"experts_per_experience": -1}, "model.head.experts_per_experience"),
        ({"num_expert": 2}, "model.head: moe takes"),
    ],
)
def test_bad_moe_specs_are_refused_naming_the_field(spec, field):
    with pytest.raises(ConfigError, match=field) as error:
        build_moe_head({"name": "moe", **spec}, 8, 3)
    assert "\n" not in str(error.value)


# -- experts per experience -------------------------------------------------------------------
class Snapshot(Callback):
    """The head's tensors at the first step and at the end of each (one-epoch) experience."""

    def __init__(self) -> None:
        self.starts, self.ends = [], []

    @staticmethod
    def _state(module):
        return {k: v.clone() for k, v in module.head.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # after the module's epoch start, where experts are added
            self.starts.append(self._state(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.ends.append(self._state(pl_module))


def test_each_experience_adds_experts_and_the_old_ones_stay_frozen(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_everything(0)
    data, model, snapshot = stream(), classifier(), Snapshot()
    logger = TensorBoardLogger(tmp_path, name="moe")
    trainer = quiet_trainer(data, tmp_path, callbacks=[snapshot], logger=logger)
    trainer.fit(model, data)
    head = model.head
    assert head.num_experts == 4 and head.num_generations == 2
    assert len(trainer.optimizers[0].param_groups) == 3  # encoder, generation 0, generation 1
    assert not any(p.requires_grad for p in head.generation_parameters(0))
    assert all(p.requires_grad for p in head.generation_parameters(1))
    (start_0, start_1), (end_0, end_1) = snapshot.starts, snapshot.ends
    assert "gates.1.weight" not in end_0 and "gates.1.weight" in start_1
    old = [k for k in end_0 if k.startswith(("gates.0.", "experts.0.", "experts.1."))]
    assert any(not torch.equal(start_0[k], end_0[k]) for k in old)  # trained in experience 0
    for key in old:
        assert torch.equal(end_1[key], end_0[key]), key  # untouched by experience 1
    new = [k for k in end_1 if k.startswith(("gates.1.", "experts.2.", "experts.3."))]
    assert new and any(not torch.equal(start_1[k], end_1[k]) for k in new)
    # the routing of each experience is in TensorBoard: per-expert scalars and a histogram
    events = EventAccumulator(str(logger.log_dir), size_guidance={"histograms": 0}).Reload()
    fractions = [events.Scalars(f"moe/expert_{i}_fraction") for i in range(4)]
    assert [len(f) for f in fractions] == [2, 2, 1, 1]  # experts 2, 3 exist from experience 1
    assert sum(f[-1].value for f in fractions) == pytest.approx(1.0)
    assert sum(f[0].value for f in fractions[:2]) == pytest.approx(1.0)
    assert [h.step for h in events.Histograms("moe/routing")] == [0, 1]


class Crash(Callback):
    """Raises at the first batch of ``epoch`` (after that epoch's checkpoint was written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("crash")


def test_a_resumed_run_rebuilds_its_experts_and_ends_as_an_uninterrupted_one(tmp_path):
    def run(folder, *callbacks, ckpt_path=None):
        seed_everything(0)
        data, model = stream(epochs=2), classifier()
        checkpoint = ExperienceCheckpoint(dirpath=str(tmp_path / folder))
        trainer = quiet_trainer(
            data, tmp_path, callbacks=[checkpoint, *callbacks], enable_checkpointing=True
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, trainer

    reference, _ = run("reference")
    with pytest.raises(RuntimeError, match="crash"):
        run("crashed", Crash(epoch=3))  # last.ckpt: the end of epoch 2, inside experience 1
    last = tmp_path / "crashed" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert any(k.startswith("head.gates.1.") for k in saved["state_dict"])
    resumed, trainer = run("crashed", ckpt_path=str(last))
    assert resumed.head.num_experts == 4
    assert len(trainer.optimizers[0].param_groups) == 3
    assert not any(p.requires_grad for p in resumed.head.generation_parameters(0))
    ours, theirs = resumed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
