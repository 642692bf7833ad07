"""MixUp/CutMix (timm) and input-noise batch transforms: targets, replay rows, seeds."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from mneme.callbacks import InputNoise, MixUp, Replay
from mneme.callbacks.replay import CURRENT_ROWS
from mneme.datamodules import ConfigError

from tests.test_strategies import tiny_data, tiny_model


def batch(n: int = 8, current: int | None = None) -> dict:
    data = tiny_data(n, num_classes=3)
    if current is not None:
        data[CURRENT_ROWS] = torch.tensor(current)
    return data


def mixup(**kwargs) -> MixUp:
    m = MixUp(**kwargs)
    m.build(3)
    return m


@pytest.mark.parametrize("kwargs", [{"mixup_alpha": 0.4}, {"mixup_alpha": 0, "cutmix_alpha": 1.0}])
def test_mixup_soft_targets_sum_to_one_and_mix(kwargs):
    m = mixup(label_smoothing=0.1, **kwargs)
    b = batch(9)  # odd: the last row is left unmixed
    out = m.augment(b, 0)
    soft = out["soft_label"]
    assert soft.shape == (9, 3)
    torch.testing.assert_close(soft.sum(1), torch.ones(9))
    assert not torch.equal(out["image"][:8], b["image"][:8])
    assert torch.equal(out["image"][8], b["image"][8])
    assert soft[8].argmax() == b["label"][8]
    # the seed decides the draw: same step, same result
    torch.testing.assert_close(m.augment(b, 0)["image"], out["image"])


def test_replay_rows_mixed_or_not_per_apply_to():
    b = batch(8, current=4)
    current = mixup(mixup_alpha=1.0, apply_to="current").augment(b, 0)
    assert torch.equal(current["image"][4:], b["image"][4:])
    assert not torch.equal(current["image"][:4], b["image"][:4])
    assert torch.equal(current["soft_label"][4:].argmax(1), b["label"][4:])
    every = mixup(mixup_alpha=1.0, apply_to="all").augment(b, 0)
    assert not torch.equal(every["image"][4:], b["image"][4:])


def test_replay_records_current_rows():
    replay = Replay(buffer_size=10, mark_current_rows=True)
    replay.update(tiny_data(10), 0)
    out = replay.replay(tiny_data(4, seed=1))
    assert int(out[CURRENT_ROWS]) == 4 and len(out["image"]) == 8
    again = replay.replay(out)  # a second Replay keeps the first count
    assert int(again[CURRENT_ROWS]) == 4 and len(again["image"]) == 16


@pytest.mark.parametrize("kind", ["gaussian", "dropout"])
def test_noise_changes_inputs_the_seed_decides(kind):
    b = batch(6, current=3)
    a = InputNoise(kind=kind, std=0.5, p=0.5, seed=1).augment(b, 0)
    assert not torch.equal(a["image"][:3], b["image"][:3])
    torch.testing.assert_close(InputNoise(kind=kind, std=0.5, p=0.5, seed=1).augment(b, 0), a)
    other = InputNoise(kind=kind, std=0.5, p=0.5, seed=2).augment(b, 0)
    assert not torch.equal(other["image"], a["image"])
    cur = InputNoise(kind=kind, std=0.5, p=0.5, apply_to="current", seed=1).augment(b, 0)
    assert torch.equal(cur["image"][3:], b["image"][3:])


def test_soft_labels_train_the_classifier_with_masked_classes():
    seed_everything(0)
    model = tiny_model()
    model.observe_experience([0, 1], [0])  # class 2 unseen: masked
    b = mixup(mixup_alpha=0.4, label_smoothing=0.2).augment(batch(8), 0)
    terms, _ = model.training_terms(b)
    assert torch.isfinite(terms["ce"]) and terms["ce"] > 0
    terms["ce"].backward()


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: MixUp(mixup_alpha=0, cutmix_alpha=0), "MixUp.mixup_alpha"),
        (lambda: MixUp(mixup_alpha=-1), "MixUp.mixup_alpha"),
        (lambda: MixUp(apply_to="replayed"), "MixUp.apply_to"),
        (lambda: MixUp(label_smoothing=1.0), "MixUp.label_smoothing"),
        (lambda: InputNoise(kind="salt"), "InputNoise.kind"),
        (lambda: InputNoise(std=-1), "InputNoise.std"),
        (lambda: InputNoise(p=1.0), "InputNoise.p"),
    ],
)
def test_bad_inputs(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_apply_to_current_needs_replay_to_mark_rows():
    class FakeTrainer:
        callbacks = [Replay(buffer_size=10)]

    with pytest.raises(ConfigError, match="Replay.mark_current_rows"):
        MixUp(apply_to="current").setup(FakeTrainer(), tiny_model(), "fit")
