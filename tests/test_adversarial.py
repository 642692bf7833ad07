"""FGSM/PGD (pixel space, eps-balls), adversarial training and the robust accuracy matrix."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.app import ContinualClassifier
from mneme.app.nn.attacks import fgsm, pgd
from mneme.callbacks import AdversarialTraining, ContinualMetrics, MixUp, Replay, RobustAccuracy
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.test_strategies import roundtrip


def trained_mlp(seed: int = 0):
    """A small MLP fitted to a separable synthetic task in [0, 1] (a few hundred steps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 16, generator=g)
    w = torch.randn(16, 3, generator=g)
    y = (x - 0.5).matmul(w).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x, y


MEAN, STD = 0.3, 0.4


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("normalization", [None, (MEAN, STD)])
def test_pgd_stays_in_the_pixel_ball_and_raises_the_loss(norm, normalization):
    model, pixels, y = trained_mlp()
    x = pixels if normalization is None else (pixels - MEAN) / STD
    eps = 0.1 if norm == "linf" else 0.5

    def loss(inp):
        return F.cross_entropy(model(inp if normalization is None else inp * STD + MEAN), y)

    g = torch.Generator().manual_seed(0)
    adv = pgd(loss, x, eps, steps=10, norm=norm, normalization=normalization, generator=g)
    adv_pixels = adv if normalization is None else adv * STD + MEAN
    delta = adv_pixels - pixels
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-5
    else:
        assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-4
    assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6
    assert loss(adv) > loss(x) + 0.05
    assert not any(p.grad is not None for p in model.parameters())  # no parameter gradient


def test_pgd_robust_accuracy_never_above_fgsm():
    model, x, y = trained_mlp()
    clean = (model(x).argmax(1) == y).float().mean()

    def loss(inp):
        return F.cross_entropy(model(inp), y)

    for eps in (0.03, 0.1, 0.2):
        fg = (model(fgsm(loss, x, eps)).argmax(1) == y).float().mean()
        pg = (model(pgd(loss, x, eps, steps=20)).argmax(1) == y).float().mean()
        assert pg <= fg <= clean


def test_eps_zero_leaves_inputs():
    model, x, y = trained_mlp()
    adv = pgd(lambda inp: F.cross_entropy(model(inp), y), x, 0.0, steps=3)
    torch.testing.assert_close(adv, x)


def fit_replay_mixup_pgd(tmp_path, ckpt_path=None):
    """Replay + MixUp + PGD training on 2 experiences of digits, with the robust matrices of
    FGSM and PGD-5 at the same eps; a checkpoint at every epoch end."""
    seed_everything(0)
    model = ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [32]},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )
    data = ContinualDataModule(
        benchmark_args={"n_experiences": 2}, epochs_per_experience=1, batch_size=64
    )
    pgd_eval = RobustAccuracy(eps=0.1, steps=5, max_batches=1)
    fgsm_eval = RobustAccuracy(eps=0.1, steps=1, random_start=False, max_batches=1, name="fgsm")
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ContinualMetrics(print_table=False),
            Replay(buffer_size=60),
            MixUp(mixup_alpha=0.2, label_smoothing=0.1),
            AdversarialTraining(eps=0.1, steps=2),
            pgd_eval,
            fgsm_eval,
            ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1),
        ],
        **data.trainer_settings(),
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, pgd_eval, fgsm_eval


def test_replay_mixup_pgd_fit_fills_the_robust_matrix_and_resumes(tmp_path):
    model, robust, fgsm_eval = fit_replay_mixup_pgd(tmp_path)
    rows = robust.rows
    assert len(rows) == 2 and all(len(r) == 2 for r in rows)
    assert all(0 <= a <= 1 for r in rows for a in r if not math.isnan(a))
    written = json.loads((tmp_path / "robust_metrics.json").read_text())
    assert written["accuracy_matrix"] == rows and "forgetting" in written
    assert written["attack"]["eps"] == 0.1
    fgsm_written = json.loads((tmp_path / "fgsm_metrics.json").read_text())
    assert fgsm_written["accuracy_matrix"] == fgsm_eval.rows
    assert fgsm_written["attack"]["steps"] == 1
    restored = RobustAccuracy(eps=0.1, steps=5)
    restored.load_state_dict(roundtrip(robust.state_dict()))
    assert restored.rows == rows and restored.state_key == robust.state_key
    # PGD-5 never leaves more robust accuracy than FGSM at the same eps, same model, same data
    assert robust.state_key != fgsm_eval.state_key
    for pgd_row, fgsm_row in zip(rows, fgsm_eval.rows, strict=True):
        for p, f in zip(pgd_row, fgsm_row, strict=True):
            assert math.isnan(p) and math.isnan(f) or p <= f
    # resumed from the boundary checkpoint (end of experience 0): Replay's buffer, MixUp's
    # and PGD's step-seeded draws and the robust rows give the uninterrupted run's model
    boundary = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed, robust2, _ = fit_replay_mixup_pgd(tmp_path / "resumed", ckpt_path=boundary)
    assert robust2.rows == rows
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key])


def test_attacks_run_in_eval_mode_and_leave_batch_norm_statistics():
    seed_everything(0)
    model = ContinualClassifier(
        encoder="mneme_cnn", encoder_args={"widths": [4]}, num_classes=3, input_shape=(1, 8, 8)
    )
    model.observe_experience([0, 1, 2], [0])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    before = [(m.running_mean.clone(), int(m.num_batches_tracked)) for m in norms]
    modes = []
    handle = norms[0].register_forward_pre_hook(lambda m, args: modes.append(m.training))
    x = torch.rand(6, 1, 8, 8)
    b = {"image": x, "label": torch.arange(6) % 3, "task": torch.zeros(6, dtype=torch.long)}
    cb = AdversarialTraining(eps=0.1, steps=3, seed=0)
    cb._module = model.train()
    adv = cb.perturb(b, 0)["image"]
    handle.remove()
    assert modes and not any(modes)  # every attack pass saw eval-mode batch norms
    for m, (mean, count) in zip(norms, before, strict=True):
        assert torch.equal(m.running_mean, mean) and int(m.num_batches_tracked) == count
    assert model.training and (adv - x).abs().max() <= 0.1 + 1e-6


def test_adversarial_training_is_seeded_and_keeps_replay_rows():
    seed_everything(0)
    model = ContinualClassifier(
        encoder="mneme_mlp", encoder_args={"hidden": [8]}, num_classes=3, input_shape=(1, 2, 2)
    )
    model.observe_experience([0, 1, 2], [0])
    x = torch.rand(6, 1, 2, 2)
    b = {"image": x, "label": torch.arange(6) % 3, "task": torch.zeros(6, dtype=torch.long)}
    b["current_rows"] = torch.tensor(4)
    cb = AdversarialTraining(eps=0.2, steps=3, apply_to="current", seed=3)
    cb._module = model
    a = cb.perturb(b, 0)
    torch.testing.assert_close(cb.perturb(b, 0)["image"], a["image"])
    assert torch.equal(a["image"][4:], x[4:]) and not torch.equal(a["image"][:4], x[:4])
    assert (a["image"] - x).abs().max() <= 0.2 + 1e-6
    assert model.training


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"eps": -0.1}, "eps"),
        ({"steps": 0}, "steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"norm": "l1"}, "norm"),
    ],
)
@pytest.mark.parametrize("cls", [AdversarialTraining, RobustAccuracy])
def test_bad_inputs(cls, kwargs, field):
    with pytest.raises(ConfigError, match=f"{cls.__name__}.{field}"):
        cls(**kwargs)


def test_robust_accuracy_names_keep_files_apart():
    class FakeTrainer:
        def __init__(self, callbacks):
            self.callbacks = callbacks

    model = ContinualClassifier(encoder="mneme_mlp", num_classes=3, input_shape=(1, 2, 2))
    twice = [RobustAccuracy(name="pgd"), RobustAccuracy(eps=0.2, name="pgd")]
    with pytest.raises(ConfigError, match="RobustAccuracy.name: 2 RobustAccuracy callbacks"):
        twice[0].setup(FakeTrainer(twice), model, "fit")
    unnamed = [RobustAccuracy(eps=0.1), RobustAccuracy(eps=0.3)]
    for cb in unnamed:
        cb.setup(FakeTrainer(unnamed), model, "fit")
    assert [cb.prefix for cb in unnamed] == ["robust", "robust_2"]
    with pytest.raises(ConfigError, match="RobustAccuracy.name"):
        RobustAccuracy(name="../x")
