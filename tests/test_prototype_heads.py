"""Prototype and analytic heads (NCM, SimpleCIL, RanPAC): each against a hand computation,
statistics that add up across experiences, the classifier that trains nothing with them,
and a resume from an experience checkpoint that gives the uninterrupted run's matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from mneme.app import ContinualClassifier
from mneme.app.nn.heads.prototypes import (
    NCMHead,
    RanPACHead,
    SimpleCILHead,
    class_means,
    prototype_logits,
)
from mneme.app.nn.heads.registry import build_head
from mneme.callbacks import ContinualMetrics, ExperienceCheckpoint
from mneme.datamodules import ConfigError, ContinualDataModule
from mneme.datamodules.data.experiences import TensorExperience

from tests.conftest import digits_stream, quiet_trainer

C, D = 4, 6


def labelled(n: int, classes, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.arange(n) % len(classes)]
    return torch.randn(n, D, generator=g) + y[:, None].float(), y


def fit(head, x, y, experience: int = 0, batch_size: int = 5) -> None:
    data = TensorExperience({"feature": x, "label": y})
    head.fit_experience(data, lambda b: (b["feature"], b["label"]), experience, batch_size)


# -- NCM, SimpleCIL, few-shot prototypes -------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_ncm_logits_equal_hand_computed_class_means(metric, normalize):
    x, y = labelled(23, [0, 2, 3])
    head = NCMHead(C, D, metric=metric, normalize=normalize)
    fit(head, x, y)
    f = F.normalize(x, dim=1) if normalize else x
    means = torch.stack([f[y == c].mean(0) if (y == c).any() else torch.zeros(D) for c in range(C)])
    q = torch.randn(7, D)
    q = F.normalize(q, dim=1) if normalize else q
    if metric == "cosine":
        expected = torch.stack([F.cosine_similarity(q, m[None], dim=1) for m in means], 1)
    else:
        expected = -torch.stack([((q - m) ** 2).sum(1) for m in means], 1)
    logits = head(q if not normalize else q * 3.0)  # scale-free once normalized
    seen = [0, 2, 3]
    torch.testing.assert_close(logits[:, seen], expected[:, seen], atol=1e-5, rtol=1e-5)
    assert head.seen.tolist() == [True, False, True, True] and head.ready


def test_simplecil_is_cosine_to_the_raw_class_means():
    x, y = labelled(20, [1, 3])
    simplecil, ncm = SimpleCILHead(C, D), NCMHead(C, D, metric="cosine")
    fit(simplecil, x, y)
    fit(ncm, x, y)
    q = torch.randn(5, D)
    weights = torch.stack([x[y == c].mean(0) for c in (1, 3)])
    expected = F.normalize(q, dim=1) @ F.normalize(weights, dim=1).T
    torch.testing.assert_close(simplecil(q)[:, [1, 3]], expected)
    torch.testing.assert_close(simplecil(q), ncm(q))


def test_few_shot_prototypes_of_a_support_set():
    """The function a prototypical-network evaluation calls: means of the support set,
    negative squared distances of the queries."""
    support, labels = labelled(15, [0, 1, 2])
    prototypes, counts = class_means(support, labels, 3)
    assert counts.tolist() == [5, 5, 5] and prototypes.dtype == support.dtype
    torch.testing.assert_close(prototypes[1], support[labels == 1].mean(0))
    queries = torch.randn(4, D)
    expected = -(torch.cdist(queries, prototypes) ** 2)
    torch.testing.assert_close(prototype_logits(queries, prototypes), expected, atol=1e-4, rtol=0)


# -- RanPAC ----------------------------------------------------------------------------------
def one_hot(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, C).double()


def test_ranpac_weights_equal_a_direct_ridge_solve_over_the_stacked_features():
    x, y = labelled(40, [0, 1, 2, 3])
    head = RanPACHead(C, D, projection_dim=16, ridges=[0.5], seed=3)
    fit(head, x[:25], y[:25], experience=0)
    fit(head, x[25:], y[25:], experience=1)
    h = F.relu(x @ head.projection).double()
    expected = torch.linalg.lstsq(
        torch.cat([h, 0.5**0.5 * torch.eye(16, dtype=h.dtype)]),
        torch.cat([one_hot(y), torch.zeros(16, C, dtype=h.dtype)]),
    ).solution  # argmin ||HW - Y||² + 0.5 ||W||²
    torch.testing.assert_close(head.weights.double(), expected, atol=1e-5, rtol=1e-4)
    q = torch.randn(3, D)
    torch.testing.assert_close(head(q), F.relu(q @ head.projection) @ head.weights)
    assert head.ridge.item() == 0.5 and int(head.fitted_experiences) == 2


def test_ranpac_ridge_is_the_least_brute_force_heldout_error():
    ridges = [1e-3, 1e-1, 1.0, 10.0, 1e3]
    head = RanPACHead(C, D, projection_dim=24, ridges=ridges, holdout=0.3, seed=1)
    parts = [labelled(30, [0, 1], seed=1), labelled(30, [2, 3], seed=2)]
    for k, (x, y) in enumerate(parts):
        fit(head, x, y, experience=k)
    held = torch.cat([head.holdout_mask(30, k) for k in range(2)])
    assert held.sum() == 18  # 30% of each experience
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    h = F.relu(x @ head.projection).double()
    errors = []
    for r in ridges:
        fit_h, fit_y = h[~held], one_hot(y[~held])
        w = torch.linalg.solve(fit_h.T @ fit_h + r * torch.eye(24, dtype=h.dtype), fit_h.T @ fit_y)
        errors.append(((one_hot(y[held]) - h[held] @ w) ** 2).sum().item())
    assert head.ridge_errors == pytest.approx(errors, rel=1e-6)
    best = ridges[min(range(len(ridges)), key=errors.__getitem__)]
    assert head.ridge.item() == best
    # then solved again on every sample, held-out ones included
    w = torch.linalg.solve(h.T @ h + best * torch.eye(24, dtype=h.dtype), h.T @ one_hot(y))
    torch.testing.assert_close(head.weights.double(), w, atol=1e-5, rtol=1e-4)


def test_statistics_of_two_experiences_equal_those_of_their_union():
    (x0, y0), (x1, y1) = labelled(17, [0, 1], seed=4), labelled(13, [1, 2, 3], seed=5)
    split = RanPACHead(C, D, projection_dim=12, ridges=[1.0], seed=0)
    union = RanPACHead(C, D, projection_dim=12, ridges=[1.0], seed=0)
    fit(split, x0, y0, experience=0)
    fit(split, x1, y1, experience=1)
    fit(union, torch.cat([x0, x1]), torch.cat([y0, y1]), batch_size=30)
    for name in ("sums", "counts", "gram", "cross", "weights"):
        a, b = getattr(split, name), getattr(union, name)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    fit(split, x1, y1, experience=1)  # already absorbed: skipped
    torch.testing.assert_close(split.counts, union.counts)


def test_heads_are_named_in_the_config():
    assert build_head(None, C, D) is None and build_head({"name": "linear"}, C, D) is None
    assert isinstance(build_head({"name": "ncm", "metric": "euclidean"}, C, D), NCMHead)
    ranpac = build_head({"name": "ranpac", "projection_dim": 8, "ridges": [1.0, 2.0]}, C, D)
    assert ranpac.projection.shape == (D, 8) and ranpac.holdout == 0.2
    bad = [
        ({"name": "ncn"}, "unknown head 'ncn' \\(did you mean ncm\\?\\)"),
        ({"name": "ncm", "metrik": "cosine"}, "ncm takes metric, normalize, not metrik"),
        ({"name": "ncm", "metric": "l1"}, "model.head.metric: one of"),
        ({"name": "linear", "metric": "cosine"}, "the linear head takes no arguments"),
        ({"name": "ranpac", "ridges": [1.0, 2.0], "holdout": 0.0}, "needs held-out samples"),
        ({"name": "ranpac", "ridges": [-1.0]}, "model.head.ridges: one or more positive"),
    ]
    for spec, message in bad:
        with pytest.raises(ConfigError, match=message):
            build_head(spec, C, D)


# -- in a classifier ---------------------------------------------------------------------------
def stream_fit(head, *, epochs: int = 1, experiences: int = 5, freeze: bool = True, **fit_args):
    seed_everything(0)
    model = ContinualClassifier(
        encoder="mneme_mlp", encoder_args={"hidden": [32]}, freeze_encoder=freeze, head=head
    )
    datamodule = ContinualDataModule(
        **digits_stream(experiences), epochs_per_experience=epochs, batch_size=64
    )
    metrics = ContinualMetrics(print_table=False)
    callbacks = [metrics, *fit_args.pop("callbacks", [])]
    ckpt_path = fit_args.pop("ckpt_path", None)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=fit_args.pop("enable_checkpointing", False),
        callbacks=callbacks,
        **datamodule.trainer_settings(**fit_args),
    )
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return trainer, model, metrics.summary()


class Snapshot(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_a_prototype_head_on_a_frozen_backbone_trains_nothing():
    snapshot = Snapshot()
    trainer, model, summary = stream_fit({"name": "ncm"}, epochs=2, callbacks=[snapshot])
    assert trainer.optimizers == [] and not model.automatic_optimization
    assert int(model.prototype_head.fitted_experiences) == 5
    R = summary["accuracy_matrix"]
    # each row already counts the classes of the experience just trained
    assert all(R[k][k] > 0.7 for k in range(5)), R
    assert summary["average_accuracy"] > 0.75
    for name, value in model.state_dict().items():
        if name.startswith(("encoder.", "head.")):
            assert torch.equal(value, snapshot.weights[name]), name


def test_a_trainable_backbone_trains_through_the_linear_head_and_predicts_by_prototypes():
    trainer, model, summary = stream_fit({"name": "ncm"}, experiences=2, freeze=False)
    assert len(trainer.optimizers) == 1 and trainer.global_step > 0
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    features = model.features(x)
    expected = model.prototype_head(features).masked_fill(
        ~model.prototype_head.seen, torch.finfo(features.dtype).min
    )
    torch.testing.assert_close(model(x), expected)
    assert summary["average_accuracy"] > 0.5


def test_resumed_from_an_experience_checkpoint_gives_the_uninterrupted_matrix(tmp_path):
    """Killed after experience 1 (a run of two experiences writes experience=1.ckpt), then
    resumed by a new model and Trainer: the statistics are neither lost nor added twice."""
    head = {"name": "ranpac", "projection_dim": 64, "ridges": [0.1, 10.0, 1000.0]}
    args = {"epochs": 2}
    _, reference, expected = stream_fit(head, **args)
    killed = ExperienceCheckpoint(dirpath=str(tmp_path))
    stream_fit(head, **args, max_epochs=4, callbacks=[killed], enable_checkpointing=True)
    checkpoint = tmp_path / "experience=1.ckpt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 3
    again = ExperienceCheckpoint(dirpath=str(tmp_path))  # the run goes on where it was
    _, resumed, summary = stream_fit(
        head, **args, ckpt_path=str(checkpoint), callbacks=[again], enable_checkpointing=True
    )
    assert summary["accuracy_matrix"] == expected["accuracy_matrix"]
    assert int(resumed.prototype_head.fitted_experiences) == 5
    for name, value in reference.prototype_head.state_dict().items():
        torch.testing.assert_close(resumed.prototype_head.state_dict()[name], value, msg=name)


def test_a_checkpoint_of_another_head_is_refused(tmp_path):
    _, model, _ = stream_fit({"name": "ncm"}, experiences=1)
    path = tmp_path / "ncm.ckpt"
    model.trainer.save_checkpoint(path)
    other = ContinualClassifier(encoder="mneme_mlp", encoder_args={"hidden": [32]})
    datamodule = ContinualDataModule(**digits_stream(1))
    trainer = quiet_trainer(datamodule)
    with pytest.raises(ConfigError, match="model.head: the checkpoint's model has head"):
        trainer.validate(other, datamodule, ckpt_path=str(path))
