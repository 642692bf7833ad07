"""FusionClassifier: tokens per encoder, cross-attention and late fusion, the paired
spoken-digit + MNIST stream, strategies on it, bad inputs."""

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from mneme.app import FusionClassifier
from mneme.app.nn.fusion_layers import encoder_tokens
from mneme.callbacks import EWC, ContinualMetrics, Replay
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import MNIST_NPZ, SHARED_DATA, digits_stream, quiet_trainer

SPOKEN_NPZ = SHARED_DATA / "spoken_digits.npz"
needs_pairs = pytest.mark.skipif(
    not (SPOKEN_NPZ.is_file() and MNIST_NPZ.is_file()), reason="../shared/data files absent"
)
SAMPLES = 2048  # a quarter second at 8 kHz: 17 spectrogram frames with hop 128
ENCODERS = {
    "audio": {"model": "mneme_cnn", "args": {"widths": [8, 16]}, "n_mels": 16, "hop_length": 128},
    "image": {"model": "mneme_cnn", "args": {"widths": [8, 16]}},
}
SHAPES = {"audio": [SAMPLES], "image": [1, 28, 28]}


def fusion(**kwargs) -> FusionClassifier:
    torch.manual_seed(0)
    args = {"encoders": ENCODERS, "embed_dim": 16, "num_heads": 2, "num_classes": 4}
    return FusionClassifier(**{**args, "input_shapes": SHAPES, **kwargs}).eval()


def batch(n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    audio = (torch.randn(n, SAMPLES, generator=g) * 3000).to(torch.int16)
    return {"audio": audio, "image": torch.randn(n, 1, 28, 28, generator=g)}


def test_encoders_give_time_frames_feature_map_positions_or_one_token():
    model = fusion()
    x = batch()
    audio, pad = encoder_tokens(model.encoders["audio"], x["audio"])
    frames = SAMPLES // 128 + 1  # 17 frames, pooled twice by the CNN: 4
    assert audio.shape == (3, frames // 4, 16) and pad is None
    image, _ = encoder_tokens(model.encoders["image"], x["image"])
    assert image.shape == (3, 7 * 7, 16)  # 28x28 pooled twice: 7x7 positions
    mlp = fusion(encoders={**ENCODERS, "image": {"model": "mneme_mlp", "args": {"hidden": [8]}}})
    vector, _ = encoder_tokens(mlp.encoders["image"], x["image"])
    assert vector.shape == (3, 1, 8)  # an encoder that returns a vector: one token


@pytest.mark.parametrize("mode", ["cross_attention", "late"])
def test_forward_shapes(mode):
    model = fusion(fusion=mode)
    x = batch(5)
    assert model.fuse(x).shape == (5, 16 * 2)  # one pooled vector per modality, concatenated
    assert model(x).shape == (5, 4)


def test_cross_attention_reads_the_other_modality():
    model = fusion(queries=["image"])  # only image tokens query; audio enters as keys/values
    x = batch()
    with torch.no_grad():
        base = model(x)
        other_audio = model({**x, "audio": batch(seed=1)["audio"]})
        other_image = model({**x, "image": batch(seed=1)["image"]})
    assert not torch.allclose(base, other_audio, atol=1e-4)  # through attention alone
    assert not torch.allclose(base, other_image, atol=1e-4)
    # ...and the attention is what carries it: with its output projection zeroed, audio
    # no longer changes anything
    with torch.no_grad():
        for block in model.blocks["image"]:
            block.attention.out_proj.weight.zero_()
            block.attention.out_proj.bias.zero_()
        assert torch.allclose(model(x), model({**x, "audio": batch(seed=1)["audio"]}))


def test_image_and_caption_tokens_with_padding_masked():
    text = {"model": "mneme-tiny-clip"}
    model = fusion(
        encoders={"image": ENCODERS["image"], "text": text},
        input_shapes={"image": [1, 28, 28], "text": [16]},
        queries=["image"],
    )
    ids = torch.zeros(2, 16, dtype=torch.long)
    ids[:, :4] = torch.tensor([49406, 320, 1125, 49407])  # <start> a photo <end>
    tokens, padding = encoder_tokens(model.encoders["text"], ids)
    assert tokens.shape == (2, 16, 64) and padding[:, 4:].all() and not padding[:, :4].any()
    x = {"image": batch(2)["image"], "text": ids}
    with torch.no_grad():
        base = model(x)
        changed = ids.clone()
        changed[:, 2] = 2368  # another word
        assert not torch.allclose(base, model({**x, "text": changed}), atol=1e-4)


# -- bad inputs -------------------------------------------------------------------------------
def test_a_modality_the_stream_lacks_is_refused_naming_the_field(tmp_path):
    data = ContinualDataModule(**digits_stream(2))  # image, label, task: no audio
    model = FusionClassifier(encoders=ENCODERS)
    with pytest.raises(ConfigError, match=r"model\.encoders\.audio: the stream has no field"):
        quiet_trainer(data, tmp_path).fit(model, data)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fusion": "cross_attn"}, "model.fusion: .*did you mean cross_attention"),
        ({"encoders": {"image": ENCODERS["image"]}}, "model.encoders: fusion needs two"),
        ({"queries": ["text"]}, "model.queries"),
        ({"num_heads": 3}, "model.num_heads: must divide"),
        ({"head": {"name": "ncm"}}, "model.head.name"),
        ({"head": {"name": "moe", "num_experts": 2, "top_k": 4}}, "model.head.top_k"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(kwargs, field):
    with pytest.raises(ConfigError, match=field) as error:
        fusion(**kwargs)
    assert "\n" not in str(error.value)


# -- the paired stream, in a continual run ----------------------------------------------------
@pytest.fixture(scope="module")
def paired() -> ContinualDataModule:
    """Two experiences of five digits, two training pairs per clip (read once)."""
    args = {"audio_path": str(SPOKEN_NPZ), "image_path": str(MNIST_NPZ), "n_experiences": 2}
    return ContinualDataModule(
        benchmark="mneme.datamodules.SpokenMNIST",
        benchmark_args={**args, "images_per_clip": 2},
        batch_size=64,
    )


@needs_pairs
def test_pairs_hold_an_mnist_image_of_the_spoken_digit(paired):
    from mneme.datamodules.streams.digits import load_mnist_npz

    data = paired
    train_rows, test_rows = (d.inputs.flatten(1) for d in load_mnist_npz(MNIST_NPZ))
    train_labels, test_labels = (torch.tensor(d.targets) for d in load_mnist_npz(MNIST_NPZ))
    assert data.sample_keys == ["audio", "label", "image", "task"]
    for experiences, rows, labels in (
        (data.train_experiences, train_rows, train_labels),
        (data.test_experiences, test_rows, test_labels),
    ):
        tensors = experiences[0].tensors
        assert tensors["audio"].shape[1:] == (8000,) and tensors["image"].shape[1:] == (1, 28, 28)
        for i in np.linspace(0, len(tensors["label"]) - 1, 8).astype(int):
            match = (rows == tensors["image"][i].flatten()).all(dim=1).nonzero().flatten()
            assert len(match) >= 1  # from this split's own rows (train or test)
            assert labels[match[0]] == tensors["label"][i]
    clips = sum(len(e) for e in data.test_experiences) * 3  # test_size 0.25 of the clips
    assert sum(len(e) for e in data.train_experiences) == 2 * clips  # two images per clip


@needs_pairs
def test_replay_ewc_metrics_and_a_moe_head_run_on_the_fused_stream(paired, tmp_path):
    seed_everything(0)
    data = paired
    head = {"name": "moe", "num_experts": 2, "top_k": 1, "hidden": 16, "experts_per_experience": 1}
    model = FusionClassifier(
        encoders={m: {**spec} for m, spec in ENCODERS.items()}, embed_dim=16, head=head
    )
    ewc, metrics = EWC(ewc_lambda=10.0, fisher_samples=64), ContinualMetrics()
    callbacks = [Replay(buffer_size=40), ewc, metrics]
    trainer = quiet_trainer(data, tmp_path, callbacks=callbacks, limit_train_batches=3)
    trainer.fit(model, data)
    assert ewc.experiences == [0, 1] and ewc.fishers[0].abs().sum() > 0
    assert len(metrics.rows) == 2 and all(0.0 <= a <= 1.0 for a in metrics.rows[1])
    assert model.head.num_experts == 3
    assert "moe_balance" in model.last_loss_terms and "ewc" in model.last_loss_terms


def test_audio_tokens_pass_through_the_encoders_spectrogram_transform():
    """SpecAugment masks act on LogMelAudio.feature_transform: the tokens must see them."""
    model = fusion()
    x = batch()["audio"]
    encoder = model.encoders["audio"]
    before, _ = encoder_tokens(encoder, x)
    encoder.feature_transform = torch.nn.ZeroPad2d((0, 0, 0, 0))  # identity by shape ...
    seen = []
    encoder.feature_transform.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert torch.allclose(encoder_tokens(encoder, x)[0], before)
    assert seen == [(3, 1, 16, SAMPLES // 128 + 1)]  # ... called on the log-mel spectrogram
