"""MetaLearner (MAML, first-order MAML, Reptile): meta-gradients against a hand-written unroll,
resume exactness, evaluation with gradients under inference mode, mixed precision, and the
one-line error of an inner learning rate that makes the loss non-finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.app.core.errors import ConfigError
from mneme.app.models.fewshot.maml import MetaLearner

SHAPE = (1, 4, 4)
N_WAY, K_SHOT, Q_QUERY = 3, 2, 2


def meta_batch(tasks: int, seed: int, shape=SHAPE, k: int = K_SHOT, scale: float = 1.0) -> dict:
    """A meta-batch of the episodic contract, with class-dependent means (learnable)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(tasks, N_WAY, *shape, generator=g)

    def draw(per_class: int):
        labels = torch.arange(N_WAY).repeat_interleave(per_class).expand(tasks, -1)
        x = means[torch.arange(tasks)[:, None], labels]
        x = x + 0.5 * torch.randn(x.shape, generator=g)
        return scale * x, labels.clone()

    xs, ys = draw(k)
    xq, yq = draw(Q_QUERY)
    classes = torch.stack([torch.randperm(20, generator=g)[:N_WAY] for _ in range(tasks)])
    return {
        "support": {"image": xs},
        "support_label": ys,
        "query": {"image": xq},
        "query_label": yq,
        "classes": classes,
    }


class Batches:
    """A re-iterable of meta-batches, drawn when iterated: ``make(epoch, index)``, as an
    episodic datamodule seeds by epoch. The epoch is the fit loop's processed-epoch count
    (see DESIGN.md, "The experience schedule"): a run resumed from an end-of-epoch
    checkpoint iterates its loader while ``current_epoch`` still shows the finished epoch."""

    def __init__(self, datamodule, n: int, make) -> None:
        self.datamodule, self.n, self.make = datamodule, n, make

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        trainer = self.datamodule.trainer
        epoch = trainer.fit_loop.epoch_progress.current.processed if trainer else 0
        return iter([self.make(epoch, i) for i in range(self.n)])


class SyntheticEpisodes(LightningDataModule):
    """Fixed synthetic meta-batches per epoch (and per rank: each rank gets its own tasks,
    ``rank_tasks`` of the ``tasks`` of a global meta-batch)."""

    input_key = "image"
    n_way = N_WAY

    def __init__(
        self, tasks: int = 4, batches: int = 2, eval_settings=((N_WAY, 1), (N_WAY, 2)), **kw
    ):
        super().__init__()
        self.tasks, self.batches, self.kw = tasks, batches, kw
        self.eval_settings = [list(s) for s in eval_settings]

    def field_shape(self, field: str):
        return self.kw.get("shape", SHAPE)

    def _shard(self, batch: dict) -> dict:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per = self.tasks // world
        part = slice(rank * per, (rank + 1) * per)
        return {
            k: ({f: t[part] for f, t in v.items()} if isinstance(v, dict) else v[part])
            for k, v in batch.items()
        }

    def train_dataloader(self):
        return Batches(
            self,
            self.batches,
            lambda e, i: self._shard(meta_batch(self.tasks, 1000 * e + i, **self.kw)),
        )

    def test_dataloader(self):
        return [
            Batches(self, 2, lambda e, i, k=k: meta_batch(3, 77 + i, k=k, **self.kw))
            for _, k in self.eval_settings
        ]


def trainer(**args) -> Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**defaults, **args})


class CaptureGrads(Callback):
    """The meta-gradients the outer optimizer receives, per step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def mlp_learner(algorithm: str, **kw) -> MetaLearner:
    seed_everything(0)
    return MetaLearner(
        encoder="mneme_mlp",
        encoder_args={"hidden": [5]},
        algorithm=algorithm,
        inner_steps=2,
        inner_lr=0.5,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        **kw,
    )


def one_step(model: MetaLearner, batch: dict) -> CaptureGrads:
    capture = CaptureGrads()

    class One(SyntheticEpisodes):
        def train_dataloader(self):
            return Batches(self, 1, lambda e, i: batch)

    trainer(max_steps=1, callbacks=[capture]).fit(model, One())
    return capture


def hand_unroll(theta: dict, batch: dict, algorithm: str, steps=2, lr=0.5) -> dict:
    """The meta-gradient written out: a 1-hidden-layer ReLU MLP and its head, by hand."""
    names = ["encoder.features.1.weight", "encoder.features.1.bias", "head.weight", "head.bias"]
    theta = {n: theta[n].detach().clone().requires_grad_(True) for n in names}

    def logits(w, x):
        h = F.relu(x.flatten(1) @ w[names[0]].T + w[names[1]])
        return h @ w[names[2]].T + w[names[3]]

    tasks = batch["support_label"].shape[0]
    total = {n: torch.zeros_like(t) for n, t in theta.items()}
    for t in range(tasks):
        w = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(
                logits(w, batch["support"]["image"][t]), batch["support_label"][t]
            )
            if algorithm == "maml":  # second order: the inner gradients are differentiated
                g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            else:  # fomaml / reptile: constants
                g = [v.detach() for v in torch.autograd.grad(loss, list(w.values()))]
            w = {n: v - lr * gv for (n, v), gv in zip(w.items(), g, strict=True)}
        if algorithm == "reptile":
            contribution = {n: theta[n].detach() - w[n].detach() for n in names}
        else:
            query = F.cross_entropy(logits(w, batch["query"]["image"][t]), batch["query_label"][t])
            contribution = dict(
                zip(names, torch.autograd.grad(query, list(theta.values())), strict=True)
            )
        for n in names:
            total[n] += contribution[n]
    return {n: total[n] / tasks for n in names}


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_meta_gradient_equals_the_hand_written_unroll(algorithm):
    batch = meta_batch(3, seed=1)
    model = mlp_learner(algorithm)
    model._build(SHAPE, N_WAY)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    capture = one_step(model, batch)
    expected = hand_unroll(theta, batch, algorithm)
    (got,) = capture.grads
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
        # SGD(lr=0.5) applied to the meta-gradient; for Reptile: theta + 0.5 (mean phi - theta)
        stepped = dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(stepped, theta[name] - 0.5 * value, rtol=1e-5, atol=1e-6)


def test_first_order_is_maml_without_the_second_order_term():
    batch = meta_batch(2, seed=2)
    grads = {}
    for algorithm in ("maml", "fomaml"):
        model = mlp_learner(algorithm)
        model._build(SHAPE, N_WAY)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads[algorithm] = one_step(model, batch).grads[0]
    # the same start, the same first-order part; MAML adds a non-zero second-order term
    second_order = hand_unroll(theta, batch, "maml")
    first_order = hand_unroll(theta, batch, "fomaml")
    for name in second_order:
        torch.testing.assert_close(grads["fomaml"][name], first_order[name], rtol=1e-5, atol=1e-6)
    difference = sum((grads["maml"][n] - grads["fomaml"][n]).abs().sum() for n in second_order)
    assert difference > 1e-3


def test_maml_meta_gradient_matches_finite_differences():
    """Independent of autograd: a central difference of the meta-objective along a random
    direction equals the directional derivative of MAML's meta-gradient."""
    torch.set_default_dtype(torch.float64)
    try:
        batch = {k: v.double() if v.is_floating_point() else v for k, v in meta_batch(2, 3).items()
                 if not isinstance(v, dict)}  # fmt: skip
        src = meta_batch(2, 3)
        batch.update({k: {"image": src[k]["image"].double()} for k in ("support", "query")})
        model = mlp_learner("maml")
        model._build(SHAPE, N_WAY)
        model.double()
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        meta_grad = one_step(model, batch).grads[0]
        g = torch.Generator().manual_seed(0)
        direction = {n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in theta.items()}

        def objective(eps: float) -> float:
            probe = mlp_learner("maml")
            probe._build(SHAPE, N_WAY)
            probe.double()  # Lightning's 32-true resets the default dtype after a fit
            with torch.no_grad():
                for n, p in probe.named_parameters():
                    p.copy_(theta[n] + eps * direction[n])
            total = 0.0
            for t in range(2):
                fast, _ = probe.adapt(
                    probe.meta_parameters(), {}, batch["support"]["image"][t],
                    batch["support_label"][t], 2, False, N_WAY,
                )  # fmt: skip
                out = probe.logits(fast, {}, batch["query"]["image"][t])
                total += F.cross_entropy(out, batch["query_label"][t]).item()
            return total / 2

        h = 1e-5
        numeric = (objective(h) - objective(-h)) / (2 * h)
        analytic = float(sum((meta_grad[n] * direction[n]).sum() for n in theta))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))
    finally:
        torch.set_default_dtype(torch.float32)


def test_zero_head_meta_learns_only_the_encoder():
    batch = meta_batch(2, seed=4)
    model = mlp_learner("maml", head_init="zero")
    capture = one_step(model, batch)
    assert model.head is None
    assert set(capture.grads[0]) == {"encoder.features.1.weight", "encoder.features.1.bias"}
    assert all(g.abs().sum() > 0 for g in capture.grads[0].values())


def learner(algorithm: str = "maml") -> MetaLearner:
    seed_everything(0)
    return MetaLearner(
        encoder="mneme_cnn",
        encoder_args={"widths": [4, 4]},
        algorithm=algorithm,
        inner_steps=2,
        inner_lr=0.3,
        eval_inner_steps=3,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
    )


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_resume_from_an_epoch_checkpoint_is_bit_identical(tmp_path, algorithm):
    kw = {"shape": (1, 8, 8), "batches": 2}
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    straight = learner(algorithm)
    trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoints]).fit(
        straight, SyntheticEpisodes(**kw)
    )
    first = sorted(tmp_path.glob("epoch=0*.ckpt"))
    assert len(first) == 1
    resumed = MetaLearner(encoder="mneme_cnn", encoder_args={"widths": [4, 4]},
                          algorithm=algorithm, inner_steps=2, inner_lr=0.3,
                          optimizer=lambda params: torch.optim.Adam(params, lr=0.01))  # fmt: skip
    trainer(max_epochs=2).fit(resumed, SyntheticEpisodes(**kw), ckpt_path=first[0])
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b) and any("running_mean" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_evaluation_adapts_with_gradients_under_inference_mode():
    model = learner("fomaml")
    datamodule = SyntheticEpisodes(shape=(1, 8, 8), batches=3)
    trainer(max_epochs=3).fit(model, datamodule)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    test = trainer(inference_mode=True)
    (logged, _) = test.test(model, datamodule, verbose=False)
    names = ["test/accuracy_3way_1shot", "test/accuracy_3way_2shot"]
    assert set(logged) == set(names)
    assert [len(m.compute()) for m in model.episode_accuracies] == [6, 6]  # 2 batches x 3
    for metric, name in zip(model.episode_accuracies, names, strict=True):
        values = metric.compute()
        assert ((values >= 0) & (values <= 1)).all()
        assert abs(values.mean().item() - logged[name]) < 1e-6
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no weight or buffer moved
    # adaptation helps: more inner steps than none, on the easy synthetic tasks
    model.eval_inner_steps = 0
    trainer().test(model, datamodule, verbose=False)
    unadapted = model.episode_accuracies[1].compute().mean()
    assert logged["test/accuracy_3way_2shot"] > unadapted


def test_bf16_mixed_precision_trains():
    model = learner("maml")
    t = trainer(max_steps=2, precision="bf16-mixed")
    t.fit(model, SyntheticEpisodes(shape=(1, 8, 8)))
    assert torch.isfinite(t.callback_metrics["train/meta_loss"])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_an_inner_lr_that_makes_the_loss_non_finite_fails_in_one_line():
    model = MetaLearner(encoder="mneme_mlp", encoder_args={"hidden": [5]}, inner_steps=3,
                        inner_lr=1e38)  # fmt: skip
    model._build(SHAPE, N_WAY)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = meta_batch(2, seed=5, scale=10.0)
    with pytest.raises(ConfigError) as err:
        one_step(model, batch)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.inner_lr: the inner loop's loss became ")
    assert "at step 1 of task 0 with inner_lr 1e+38; lower it" in message
    for n, p in model.named_parameters():  # no step was taken
        assert torch.equal(p.detach(), theta[n])


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"algorithm": "mamlx"}, "model.algorithm"),
        ({"inner_lr": 0.0}, "model.inner_lr"),
        ({"inner_lr": float("inf")}, "model.inner_lr"),
        ({"inner_steps": 0}, "model.inner_steps"),
        ({"head_init": "random"}, "model.head_init"),
    ],
)
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        MetaLearner(**args)


def test_a_head_of_another_n_way_than_an_eval_setting_is_refused():
    model = learner()
    with pytest.raises(ConfigError, match=r"^data.eval_settings: \[5, 1\] has 5 classes"):
        trainer(max_steps=1).fit(model, SyntheticEpisodes(shape=(1, 8, 8), eval_settings=[(5, 1)]))


def digit_episodes():
    from mneme.datamodules import EpisodicDataModule

    return EpisodicDataModule(
        benchmark="mneme.datamodules.SplitDigits",
        meta_train_classes=[0, 1, 2, 3],
        meta_val_classes=[4, 5, 6],
        meta_test_classes=[7, 8, 9],
        n_way=3,
        k_shot=1,
        q_queries=2,
        eval_settings=[[3, 1], [3, 2]],
        train_episodes=4,
        eval_episodes=3,
        tasks_per_batch=2,
    )


def test_meta_trains_validates_and_tests_on_the_episodic_datamodule(tmp_path):
    model = learner("maml")
    fit = trainer(max_epochs=2)
    fit.fit(model, digit_episodes())
    assert "val/accuracy_3way_1shot" in fit.callback_metrics  # val: the first eval setting
    assert torch.isfinite(fit.callback_metrics["train/meta_loss"])
    from mneme.callbacks.reporting.fewshot_metrics import FewShotMetrics

    test = trainer(callbacks=[FewShotMetrics(print_table=False)], default_root_dir=tmp_path)
    (logged, _) = test.test(model, digit_episodes(), verbose=False)
    assert {"test/accuracy_3way_1shot", "test/accuracy_3way_2shot"} <= set(logged)
    assert any(k.startswith("fewshot/") for k in logged)  # the reporter reads the metrics
    # 3 episodes per setting, in meta-batches of 2: the padded repeat is left out
    assert [len(m.compute()) for m in model.episode_accuracies] == [3, 3]


def test_resume_on_the_episodic_datamodule_is_bit_identical(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    straight = learner("maml")
    # the datamodule's trainer settings rebuild the loader each epoch (the running epoch's
    # episodes, right after a resume too)
    settings = digit_episodes().trainer_settings()
    fit = trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoints], **settings)
    fit.fit(straight, digit_episodes())
    (first,) = sorted(tmp_path.glob("epoch=0*.ckpt"))
    resumed = learner("maml")
    trainer(max_epochs=2, **settings).fit(resumed, digit_episodes(), ckpt_path=first)
    a, b = straight.state_dict(), resumed.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
