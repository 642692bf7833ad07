"""Continual strategies as callbacks: EWC, Replay, LwF (math, state, end-to-end, DDP)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.app import ContinualClassifier
from mneme.app.core.seeding import derive_seed
from mneme.callbacks import EWC, ContinualMetrics, LwF, Replay
from mneme.callbacks.strategies.lwf import distillation_loss
from mneme.datamodules import ConfigError, ContinualDataModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def tiny_model(num_classes: int = 3, num_tasks: int = 1, seed: int = 0) -> ContinualClassifier:
    torch.manual_seed(seed)
    return ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [5]},
        num_classes=num_classes,
        num_tasks=num_tasks,
        input_shape=(1, 2, 2),
    )


def tiny_data(n: int, num_classes: int = 3, seed: int = 0, task: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 1, 2, 2, generator=g),
        "label": torch.arange(n) % num_classes,
        "task": torch.full((n,), task),
    }


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- EWC --------------------------------------------------------------------------------------
def hand_fisher(model, data, batch_size) -> dict[str, torch.Tensor]:
    """Avalanche's estimate: eval mode, squared mean-batch CE gradient, averaged over batches."""
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = 0
    for start in range(0, len(data["label"]), batch_size):
        model.zero_grad()
        part = slice(start, start + batch_size)
        F.cross_entropy(
            model(data["image"][part], data["task"][part]), data["label"][part]
        ).backward()
        for n, p in model.named_parameters():
            total[n] += p.grad**2
        batches += 1
    model.train()
    model.zero_grad()
    return {n: t / batches for n, t in total.items()}


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def test_fisher_is_the_mean_of_squared_batch_gradients():
    model = tiny_model()
    model.observe_experience([0, 1, 2], [0])
    data = tiny_data(7)  # batches of 3, 3, 1
    ewc = EWC(fisher_batch_size=3)
    ewc._bind(model)
    fisher = ewc.estimate_fisher(model, data, experience=0, trainer=None)
    assert torch.allclose(fisher, flat(hand_fisher(model, data, 3)), atol=1e-7)
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    # a subset: fisher_samples draws a fixed subset (seeded by experience), in index order
    sub = EWC(fisher_batch_size=2, fisher_samples=4)
    sub._bind(model)
    index = torch.randperm(7, generator=torch.Generator().manual_seed(derive_seed(0, 0)))
    part = {k: v[index[:4].sort().values] for k, v in data.items()}
    expected = flat(hand_fisher(model, part, 2))
    assert torch.allclose(sub.estimate_fisher(model, data, 0, None), expected, atol=1e-7)


def random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(p.numel() for p in model.parameters())
    return torch.rand(n, generator=g), torch.randn(n, generator=g)


def theta(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def hand_penalty(model, pairs, lam):
    params = torch.cat([p.reshape(-1) for p in model.parameters()])
    return lam / 2 * sum((f * (params - a) ** 2).sum() for f, a in pairs)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_ewc_penalty_and_gradient_equal_hand_computation(mode, decoupled):
    model = tiny_model()
    gamma = 0.5 if mode == "online" else None
    ewc = EWC(ewc_lambda=3.0, mode=mode, decay_factor=gamma, decoupled=decoupled)
    ewc._bind(model)
    outputs = {"logits": torch.zeros(1, 3)}
    assert ewc.penalty({}, outputs).item() == 0.0  # nothing consolidated yet
    (f1, a1), (f2, a2) = random_state(model, 1), random_state(model, 2)
    if mode == "separate":
        ewc.fishers, ewc.anchors, pairs = [f1, f2], [a1, a2], [(f1, a1), (f2, a2)]
    else:
        ewc.fishers, ewc.anchors, pairs = [0.5 * f1 + f2], [a2], [(0.5 * f1 + f2, a2)]
    ewc.consolidate()
    value = ewc.penalty({}, outputs)
    if decoupled:  # the value carries no gradient; it is added before the optimizer step
        assert not value.requires_grad
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        ewc.on_before_optimizer_step(None, model, None)
    else:
        value.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = hand_penalty(model, pairs, 3.0)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    for g, p in zip(got, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_online_vs_separate_updates():
    model = tiny_model()
    model.observe_experience([0, 1, 2], [0])
    d1, d2 = tiny_data(6, seed=1), tiny_data(6, seed=2)
    sep, onl = EWC(fisher_batch_size=3), EWC(mode="online", decay_factor=0.7, fisher_batch_size=3)
    for ewc in (sep, onl):
        ewc.update(model, d1, 0)
    f1, a1 = flat(hand_fisher(model, d1, 3)), theta(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    for ewc in (sep, onl):
        ewc.update(model, d2, 1)
    f2, a2 = flat(hand_fisher(model, d2, 3)), theta(model)
    assert sep.experiences == onl.experiences == [0, 1]
    assert len(sep.fishers) == 2 and len(onl.fishers) == 1
    assert torch.allclose(sep.fishers[0], f1, atol=1e-7)
    assert torch.allclose(sep.fishers[1], f2, atol=1e-7)
    assert torch.allclose(sep.anchors[0], a1) and torch.allclose(sep.anchors[1], a2)
    assert torch.allclose(onl.fishers[0], 0.7 * f1 + f2, atol=1e-7)
    assert torch.allclose(onl.anchors[0], a2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(-0.05)
    out = {"logits": torch.zeros(1)}
    assert sep.penalty({}, out).item() == pytest.approx(
        hand_penalty(model, [(f1, a1), (f2, a2)], 1).item(), rel=1e-5
    )
    assert onl.penalty({}, out).item() == pytest.approx(
        hand_penalty(model, [(0.7 * f1 + f2, a2)], 1).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="decay_factor"):
        EWC(mode="online")
    with pytest.raises(ValueError, match="decay_factor"):
        EWC(decay_factor=0.5)
    with pytest.raises(ValueError, match="ewc_lambda"):
        EWC(ewc_lambda=-1.0)


def test_ewc_state_roundtrip():
    model = tiny_model()
    ewc = EWC(ewc_lambda=2.0, fisher_batch_size=4)
    ewc.update(model, tiny_data(8), 0)
    ewc.update(model, tiny_data(8, seed=3), 1)
    state = roundtrip(ewc.state_dict())
    other = EWC(ewc_lambda=2.0)
    other.load_state_dict(state)
    other._bind(model)
    other.consolidate()
    assert other.experiences == [0, 1] and other.names == ewc.names
    with torch.no_grad():
        model.head.weight.add_(0.3)
    out = {"logits": torch.zeros(1)}
    assert other.penalty({}, out).item() == pytest.approx(ewc.penalty({}, out).item())
    with pytest.raises(ValueError, match="mode"):
        EWC(mode="online", decay_factor=1.0).load_state_dict(state)


# -- Replay -----------------------------------------------------------------------------------
def stream_data(n: int, classes: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 1, 2, 2, generator=g),
        "text": torch.randint(0, 100, (n, 7), generator=g),  # any extra key travels along
        "label": torch.tensor(classes).repeat(n // len(classes) + 1)[:n],
        "task": torch.zeros(n, dtype=torch.long),
        "uid": torch.arange(n) + 1000 * seed,
    }


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    replay = Replay(buffer_size=100, policy="reservoir")
    replay.update(stream_data(60, [0, 1], 0), 0)
    assert len(replay) == 60  # not full yet: keeps everything
    replay.update(stream_data(300, [2, 3], 1), 1)
    replay.update(stream_data(100, [4, 5], 2), 2)
    assert len(replay) == 100 and replay.experiences == [0, 1, 2]
    assert all(len(v) == 100 for v in replay.buffer.values())
    # each sample survives with probability 100/460: expected 13, 65, 22 of experiences 0, 1, 2
    counts = torch.bincount(replay.buffer["uid"] // 1000, minlength=3).tolist()
    assert sum(counts) == 100
    assert 5 <= counts[0] <= 22 and 50 <= counts[1] <= 80 and 12 <= counts[2] <= 33, counts
    # the buffer is the top-weighted samples, rows and weights aligned
    assert replay.weights.min() > 1 - 100 / 460 - 0.1
    assert torch.equal(replay.buffer["label"] // 2, replay.buffer["uid"] // 1000)
    replay.update(stream_data(100, [4, 5], 2), 2)  # an experience already in: no-op
    assert torch.bincount(replay.buffer["uid"] // 1000, minlength=3).tolist() == counts


def test_class_balanced_quotas():
    replay = Replay(buffer_size=103, policy="class_balanced")
    replay.update(stream_data(300, [0, 1, 2], 0), 0)
    assert torch.bincount(replay.buffer["label"]).tolist() == [35, 34, 34]
    replay.update(stream_data(400, list(range(3, 10)), 1), 1)
    # 103 over 10 classes: 10 each, the remainder to the smallest class ids
    assert torch.bincount(replay.buffer["label"]).tolist() == [11, 11, 11] + [10] * 7
    small = Replay(buffer_size=20, policy="class_balanced")
    small.update(stream_data(12, [0, 0, 0, 0, 0, 1], 0), 0)  # class 1 has only 2 samples
    assert torch.bincount(small.buffer["label"]).tolist() == [10, 2]


def test_replay_appends_every_key_deterministically():
    replay = Replay(buffer_size=50, replay_batch_size=8, seed=3)
    batch = {k: v[:4] for k, v in stream_data(4, [7], 9).items()}
    assert replay.replay(batch) is batch  # empty buffer: unchanged
    replay.update(stream_data(40, [0, 1], 0), 0)
    out = replay.replay(batch)
    assert set(out) == set(batch)
    assert all(len(v) == 12 for v in out.values())
    assert all(torch.equal(out[k][:4], batch[k]) for k in batch)
    uid = out["uid"][4:]
    assert len(set(uid.tolist())) == 8  # without replacement
    for k in ("image", "text", "label"):  # rows stay aligned across keys
        rows = replay.buffer["uid"].tolist()
        assert torch.equal(out[k][4:], replay.buffer[k][[rows.index(u) for u in uid.tolist()]])
    assert torch.equal(replay.replay(batch)["uid"], out["uid"])  # same step, same draw
    assert torch.equal(replay.sample(8, 0, 5, 1), replay.sample(8, 0, 5, 1))
    assert not torch.equal(replay.sample(8, 0, 5, 1), replay.sample(8, 0, 6, 1))
    # a replay batch larger than the buffer: with replacement
    assert len(replay.sample(100, 0, 0, 0)) == 100
    # a restored buffer draws the same samples
    other = Replay(buffer_size=50, replay_batch_size=8, seed=3)
    other.load_state_dict(roundtrip(replay.state_dict()))
    assert torch.equal(other.replay(batch)["image"], out["image"])
    with pytest.raises(ConfigError, match="audio"):
        replay.replay({**batch, "audio": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="policy"):
        Replay(policy="fifo")


def test_reservoir_replays_label_free_pairs():
    pairs = {"image": torch.randn(30, 3), "text": torch.randint(0, 9, (30, 4))}
    replay = Replay(buffer_size=10, replay_batch_size=5)
    replay.update(pairs, 0)
    out = replay.replay({k: v[:2] for k, v in pairs.items()})
    assert len(replay) == 10 and {k: len(v) for k, v in out.items()} == {"image": 7, "text": 7}
    with pytest.raises(ConfigError, match="label"):
        Replay(policy="class_balanced").update(pairs, 0)


def test_replay_shards_by_rank():
    data = stream_data(10, [0], 0)
    r0, r1 = Replay(100), Replay(100)
    r0.update(data, 0, rank=0, world_size=2)
    r1.update(data, 0, rank=1, world_size=2)
    assert sorted(r0.buffer["uid"].tolist()) == [0, 2, 4, 6, 8]
    assert sorted(r1.buffer["uid"].tolist()) == [1, 3, 5, 7, 9]


# -- LwF --------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tasks", [1, 2])
def test_lwf_zero_for_identical_student_positive_otherwise(num_tasks):
    model = tiny_model(num_classes=4, num_tasks=num_tasks)
    model.observe_experience([0, 1], [0])
    lwf = LwF(alpha=[0.0, 2.0], temperature=3.0)
    previous = torch.zeros(model.num_heads, 4, dtype=torch.bool)
    previous[0, :2] = True
    lwf.setup(None, model, "fit")
    lwf.set_teacher(model, 1, previous)
    assert not any(p.requires_grad for p in lwf.teacher.parameters())
    model.observe_experience([2, 3], [num_tasks - 1])
    data = tiny_data(6, num_classes=4, task=num_tasks - 1)

    def term():
        features = model.encoder(data["image"])
        logits = model.logits(features, data["task"])
        return lwf.distillation(data, {"logits": logits, "features": features})

    assert term().item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.head.weight.add_(torch.randn_like(model.head.weight))
    value = term()
    assert value.item() > 0
    # by hand: 2.0 * KL(teacher || student) at T=3 over head 0, classes 0 and 1
    student = model.head(model.encoder(data["image"]))[:, :2]
    teacher = lwf.teacher.head(lwf.teacher.encoder(data["image"]))[:, :2]
    expected = 2.0 * F.kl_div(
        torch.log_softmax(student / 3, 1), torch.softmax(teacher / 3, 1), reduction="batchmean"
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    value.backward()
    assert model.head.weight.grad is not None


def test_lwf_state_roundtrip_restores_the_teacher():
    model = tiny_model(num_classes=4)
    lwf = LwF()
    previous = torch.tensor([[True, True, False, False]])
    lwf.set_teacher(model, 1, previous)
    teacher_weights = {k: v.clone() for k, v in lwf.teacher.state_dict().items()}
    state = roundtrip(lwf.state_dict())
    with torch.no_grad():  # the model moves on; the teacher must not
        model.head.weight.add_(1.0)
    other = LwF()
    other.load_state_dict(state)
    other.setup(None, model, "fit")
    other.on_train_start(None, model)
    assert other.experience == 1 and torch.equal(other.previous_classes, previous)
    for k, v in other.teacher.state_dict().items():
        assert torch.equal(v, teacher_weights[k])
    assert roundtrip(LwF().state_dict()) == {"version": 1, "experience": None}


# -- end to end -------------------------------------------------------------------------------
def fit(*strategies, epochs: int = 2, ckpt_dir: Path | None = None, ckpt_path=None, **trainer):
    seed_everything(0)
    model = ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [128]},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )
    data = ContinualDataModule(epochs_per_experience=epochs, batch_size=32)
    metrics = ContinualMetrics(print_table=False)
    extra = []
    if ckpt_dir is not None:
        extra.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
            )
        )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics, *strategies, *extra],
        **trainer,
        **data.trainer_settings(),
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, metrics.summary()


@pytest.fixture(scope="module")
def naive():
    return fit()[2]


def test_fit_replay_reduces_forgetting(naive):
    replay = Replay(buffer_size=200, policy="class_balanced")
    trainer, _, summary = fit(replay)
    assert replay.experiences == [0, 1, 2, 3, 4] and len(replay) == 200
    assert naive["forgetting"] > 0.8
    assert summary["forgetting"] < naive["forgetting"] - 0.3
    assert summary["average_accuracy"] > naive["average_accuracy"] + 0.3


def test_fit_ewc_and_lwf(naive):
    ewc = EWC(ewc_lambda=10.0)  # SGD is stable while lr * λ * max(F) stays small
    trainer, model, summary = fit(ewc)
    assert ewc.experiences == [0, 1, 2, 3, 4] and len(ewc.fishers) == 5
    assert 0 < trainer.callback_metrics["train/loss_ewc"] < 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert summary["accuracy_matrix"][-1][-1] > 0.8
    lwf = LwF(alpha=1.0)
    trainer, _, summary = fit(lwf)
    assert lwf.experience == 4 and lwf.previous_classes.sum() == 8
    assert trainer.callback_metrics["train/loss_lwf"] > 0
    assert len(summary["accuracy_matrix"]) == 5


@pytest.mark.parametrize("accumulate", [1, 2])
def test_decoupled_ewc_trains_like_backpropagated_ewc(accumulate):
    """The gradient added before the optimizer step equals the back-propagated one, also
    with gradient accumulation (the loss is divided, the penalty added once per step)."""
    runs = [
        fit(EWC(ewc_lambda=20.0, decoupled=d), accumulate_grad_batches=accumulate)[1]
        for d in (True, False)
    ]
    for (name, a), b in zip(*(r.state_dict().items() for r in runs), strict=True):
        assert torch.allclose(a, b[1], atol=1e-5), name


def test_fit_replay_with_ewc(naive):
    ewc, replay = EWC(ewc_lambda=10.0, mode="online", decay_factor=0.9), Replay(buffer_size=200)
    trainer, _, summary = fit(replay, ewc)
    assert ewc.experiences == [0, 1, 2, 3, 4] and len(replay) == 200
    assert trainer.callback_metrics["train/loss_ewc"] > 0
    assert summary["forgetting"] < naive["forgetting"] - 0.3


def test_resume_mid_experience_and_at_boundary_matches_uninterrupted(tmp_path):
    """Replay draws, the EWC state and the LwF teacher survive a restart: resuming from
    the end of epoch 2 (inside experience 1) or epoch 3 (its end) ends with the same weights."""

    def strategies():
        return Replay(buffer_size=100), EWC(ewc_lambda=50.0), LwF(alpha=0.5)

    _, reference, _ = fit(*strategies(), ckpt_dir=tmp_path)
    for epoch in (2, 3):
        ckpt = next(tmp_path.glob(f"epoch={epoch}-*.ckpt"))
        _, resumed, _ = fit(*strategies(), ckpt_path=ckpt)
        for (name, a), b in zip(
            reference.state_dict().items(), resumed.state_dict().values(), strict=True
        ):
            assert torch.allclose(a, b, atol=1e-6), (epoch, name)


# -- DDP --------------------------------------------------------------------------------------
class DumpState(Callback):
    """Saves each rank's EWC and Replay state at the end of fit."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        ewc = next(c for c in trainer.callbacks if isinstance(c, EWC))
        replay = next(c for c in trainer.callbacks if isinstance(c, Replay))
        state = {"ewc": ewc.state_dict(), "replay": replay.state_dict()}
        torch.save(state, f"{self.out}/rank{trainer.global_rank}.pt")


def test_ddp_fisher_identical_across_ranks(tmp_path):
    seed_everything(0)
    model = ContinualClassifier(encoder="mneme_mlp", encoder_args={"hidden": [32]})
    data = ContinualDataModule(
        benchmark="mneme.datamodules.SplitDigits",
        benchmark_args={"n_experiences": 2},
        batch_size=32,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        **data.trainer_settings(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EWC(), Replay(buffer_size=50), DumpState(str(tmp_path))],
    )
    trainer.fit(model, data)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ewc"]["experiences"] == [0, 1]
    for f0, f1 in zip(
        r0["ewc"]["fishers"] + r0["ewc"]["anchors"],
        r1["ewc"]["fishers"] + r1["ewc"]["anchors"],
        strict=True,
    ):
        assert torch.equal(f0, f1)
    assert r0["ewc"]["fishers"][0].abs().sum() > 0
    # each rank's buffer holds its own shard: equal sizes, no common sample
    # (the state gathers every rank's buffer, so either rank's state holds both)
    i0, i1 = (r0["replay"]["ranks"][r]["buffer"]["image"] for r in (0, 1))
    assert torch.equal(r1["replay"]["ranks"][1]["buffer"]["image"], i1)
    assert len(i0) == len(i1) == 50
    assert not (i0.flatten(1)[:, None] == i1.flatten(1)[None]).all(-1).any()


def test_replay_checkpoints_each_ranks_buffer_and_refuses_another_world_size():
    replay = Replay(buffer_size=10)
    replay.update(stream_data(40, [0, 1], 0), 0)
    state = replay.state_dict()
    assert len(state["ranks"]) == 1  # one process: its own buffer
    two_ranks = {**state, "ranks": [state["ranks"][0], state["ranks"][0]]}
    with pytest.raises(ConfigError, match="--trainer.devices 2"):
        Replay(buffer_size=10).load_state_dict(two_ranks)
    legacy = {k: v for k, v in state.items() if k != "ranks"} | state["ranks"][0]
    restored = Replay(buffer_size=10)
    restored.load_state_dict(legacy)  # mneme 0.1.0's layout: one buffer
    assert torch.equal(restored.buffer["label"], replay.buffer["label"])


def test_replay_appends_as_many_samples_as_the_batch_holds_by_default():
    replay = Replay(buffer_size=50)
    replay.update(stream_data(60, [0, 1], 0), 0)
    batch = {k: v[:3] for k, v in stream_data(10, [2], 1).items()}
    # a batch_size larger than the experience gives a small batch: the replay share follows
    assert len(replay.replay(batch)["label"]) == 6
