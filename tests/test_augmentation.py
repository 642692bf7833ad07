"""MixUp/CutMix (timm) and input-noise batch transforms: targets, replay rows, seeds."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from mneme.callbacks import InputNoise, MixUp, Replay
from mneme.callbacks.run_context import CURRENT_ROWS
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
    terms, outputs = model.training_terms(b)
    # by hand: the smoothed targets' mass on the masked class 2 dropped, the rest renormalized
    logits = outputs["logits"].detach()
    assert (logits[:, 2] == torch.finfo(logits.dtype).min).all()
    target = b["soft_label"][:, :2] / b["soft_label"][:, :2].sum(dim=1, keepdim=True)
    expected = -(target * torch.log_softmax(logits[:, :2], dim=1)).sum(dim=1).mean()
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["ce"].backward()
    grad = model.head.weight.grad
    assert grad[:2].abs().sum() > 0 and grad[2].abs().sum() == 0  # nothing pushes class 2


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


# -- SpecAugment: masks on the audio encoder's log-mel ----------------------------------------
def test_mask_along_axis_zeroes_bands_within_width_on_the_first_rows():
    from mneme.callbacks.training.spec_augment import mask_along_axis

    spec = torch.randn(6, 1, 20, 30) + 5.0  # no exact zeros
    g = torch.Generator().manual_seed(0)
    out = mask_along_axis(spec, 2, count=1, max_width=4, rows=4, generator=g)
    assert torch.equal(out[4:], spec[4:])  # rows past `rows` untouched
    zero_bins = (out[:4, 0] == 0).all(dim=2)  # (4, n_mels): whole frequency bins masked
    assert ((out[:4, 0] == 0) == zero_bins.unsqueeze(-1)).all()  # masks are whole bins
    widths = zero_bins.sum(1)
    assert widths.max() <= 4 and widths.sum() > 0
    for row in zero_bins:  # one band: its masked bins are contiguous
        idx = row.nonzero().squeeze(1)
        assert len(idx) == 0 or idx[-1] - idx[0] + 1 == len(idx)
    g = torch.Generator().manual_seed(0)
    again = mask_along_axis(spec, 2, count=1, max_width=4, rows=4, generator=g)
    assert torch.equal(again, out)
    t = mask_along_axis(spec, 3, 2, 30, 6, torch.Generator().manual_seed(1))
    assert ((t[:, 0] == 0).all(dim=1).sum(1) <= 60).all() and (t == 0).any()


_ALIGNER: list = []  # built once (the tiny CLIP text tower takes a second), copied per test


def tiny_audio_aligner():
    import copy

    if not _ALIGNER:
        _ALIGNER.append(_build_audio_aligner())
    return copy.deepcopy(_ALIGNER[0])


def _build_audio_aligner():
    from mneme.app.models.aligner import ContrastiveAligner

    torch.manual_seed(0)
    audio = {"model": "mneme_cnn", "args": {"widths": [4, 8]}, "n_mels": 16, "hop_length": 64}
    module = ContrastiveAligner(
        encoders={"audio": audio, "text": {}},
        pairs=[["audio", "text"]],
        zero_shot_modality="audio",
        embed_dim=8,
        input_shapes={"audio": (1600,), "text": (16,)},
        num_classes=3,
    )
    module.set_prompts(["zero", "one", "two"], ["a {}"])
    return module


def audio_batch(n: int = 6, current: int | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    b = {
        "audio": (torch.randn(n, 1600, generator=g) * 3000).to(torch.int16),
        "text": torch.randint(1, 50, (n, 16), generator=g),
        "label": torch.arange(n) % 3,
    }
    if current is not None:
        b[CURRENT_ROWS] = torch.tensor(current)
    return b


def spectrograms(module, wave) -> torch.Tensor:
    """The log-mel the audio backbone receives (after the feature transform)."""
    seen = []
    host = module.encoders["audio"].backbone
    handle = host.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    module.encoders["audio"](wave)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("apply_to", ["all", "current"])
def test_spec_augment_masks_training_log_mels_only(apply_to):
    import copy

    from mneme.callbacks import SpecAugment

    module = tiny_audio_aligner().train()
    aug = SpecAugment(freq_masks=2, freq_width=4, time_masks=2, time_width=5, apply_to=apply_to)
    aug.on_fit_start(None, module)
    b = audio_batch(6, current=4)
    clean = module.encoders["audio"].backbone.frontend(b["audio"])
    assert torch.equal(spectrograms(module, b["audio"]), clean)  # not armed yet: identity
    out = aug.augment(b, 0)
    assert out is b  # the batch is unchanged: the masks act inside the encoder
    masked = spectrograms(module, b["audio"])
    rows = 6 if apply_to == "all" else 4
    assert not torch.equal(masked[:rows], clean[:rows])
    assert torch.equal(masked[rows:], clean[rows:])  # replayed clips kept with `current`
    changed = masked != clean
    assert (masked[changed] == 0).all()  # masked bins take the clip mean, 0
    torch.testing.assert_close(spectrograms(module, b["audio"]), masked)  # same step, same
    # a gradient flows through the masked input; eval mode and a deep-copied teacher in
    # eval mode see the clean log-mel
    module.encoders["audio"](b["audio"]).sum().backward()
    assert all(p.grad is not None for p in module.encoders["audio"].backbone.parameters())
    teacher = copy.deepcopy(module.encoders).eval()
    assert torch.equal(teacher["audio"].backbone.feature_transform(clean), clean)
    module.eval()
    assert torch.equal(spectrograms(module, b["audio"]), clean)
    aug.teardown(None, module, "fit")
    assert isinstance(module.encoders["audio"].backbone.feature_transform, torch.nn.Identity)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"freq_masks": -1}, "SpecAugment.freq_masks"),
        ({"time_width": 2.5}, "SpecAugment.time_width"),
        ({"freq_masks": 0, "time_masks": 0}, "SpecAugment.freq_masks"),
        ({"apply_to": "replayed"}, "SpecAugment.apply_to"),
    ],
)
def test_spec_augment_bad_inputs(kwargs, field):
    from mneme.callbacks import SpecAugment

    with pytest.raises(ConfigError, match=field):
        SpecAugment(**kwargs)


def test_spec_augment_needs_a_log_mel_encoder():
    from mneme.callbacks import SpecAugment

    with pytest.raises(ConfigError, match="SpecAugment.input_key: .*no log-mel encoder"):
        SpecAugment().on_fit_start(None, tiny_model())
    with pytest.raises(ConfigError, match="SpecAugment.input_key"):
        SpecAugment(input_key="speech").on_fit_start(None, tiny_audio_aligner())


def test_spec_augment_masks_are_a_function_of_seed_and_step():
    """No RNG state to checkpoint: a fresh callback (a resumed run) at the same global step
    draws the same masks; the next step draws others."""
    from types import SimpleNamespace

    from mneme.callbacks import SpecAugment

    module = tiny_audio_aligner().train()
    b = audio_batch(4)

    def masked(step: int) -> torch.Tensor:
        aug = SpecAugment(freq_masks=2, freq_width=4, time_masks=2, time_width=5, seed=7)
        aug.on_fit_start(None, module)
        aug._trainer = SimpleNamespace(global_rank=0, global_step=step)
        aug.augment(b, 0)
        return spectrograms(module, b["audio"])

    assert torch.equal(masked(5), masked(5))
    assert not torch.equal(masked(5), masked(6))


def test_spec_augment_refuses_a_module_that_bypasses_the_hook():
    """A module reading the front end itself (past LogMelAudio.forward) would train unmasked:
    the first training step's end says so in one line."""
    from mneme.callbacks import SpecAugment

    module = tiny_audio_aligner().train()
    b = audio_batch(4)
    aug = SpecAugment()
    aug.on_fit_start(None, module)
    aug.augment(b, 0)
    host = module.encoders["audio"].backbone
    host.backbone(host.frontend(b["audio"]))  # the bypass: no feature_transform
    with pytest.raises(ConfigError, match="SpecAugment.input_key: .*without LogMelAudio"):
        aug.on_train_batch_end(None, module, None, b, 0)
    aug.augment(b, 1)
    module.encoders["audio"](b["audio"])  # through the encoder: masked, accepted
    aug.on_train_batch_end(None, module, None, b, 1)
    assert aug._verified
