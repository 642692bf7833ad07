"""Alignment: encoders, InfoNCE, retrieval/zero-shot metrics, callbacks, and a CLI fit."""

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from mneme.app.nn.log_mel import LogMel, mel_filterbank
from mneme.app.nn.losses import AlignmentLoss
from mneme.app.nn.modalities import build_encoder
from mneme.app.nn.retrieval import CrossModalRecall, class_embeddings

D = 32


def is_normalized(x):
    return torch.allclose(x.norm(dim=-1), torch.ones(len(x)), atol=1e-5)


# -- encoders ---------------------------------------------------------------------------------
def test_timm_image_encoder_shapes_normalization_and_local_weights(tmp_path):
    spec = {"model": "mneme_mlp", "args": {"hidden": [16]}}
    enc = build_encoder("image", spec, D, (1, 8, 8))
    out = enc(torch.rand(5, 1, 8, 8))
    assert out.shape == (5, D) and is_normalized(out)
    path = tmp_path / "image.pt"
    torch.save(enc.backbone.backbone.state_dict(), path)
    loaded = build_encoder("image", {**spec, "weights": str(path)}, D, (1, 8, 8))
    for p, q in zip(enc.backbone.parameters(), loaded.backbone.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory):
    model = open_clip.create_model("mneme-tiny-clip", pretrained=None)  # standard CLIP layout
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_open_clip_text_encoder_tokenizes_pads_and_loads_clip_weights(tiny_clip_weights):
    model, path = tiny_clip_weights
    enc = build_encoder("text", {"model": "mneme-tiny-clip", "weights": str(path)}, D)
    tokens = enc.backbone.tokenize(["a handwritten seven", "the digit two"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    out = enc(tokens)
    assert out.shape == (2, D) and is_normalized(out)
    torch.testing.assert_close(enc(tokens[:, :10]), out)  # shorter ids are zero-padded
    # the CLIP checkpoint (text weights at the top level) loads into the text tower
    torch.testing.assert_close(
        enc.backbone.tower.token_embedding.weight, model.token_embedding.weight
    )
    expected = model.encode_text(tokens)
    torch.testing.assert_close(enc.backbone(tokens), expected)


def test_open_clip_visual_encoder_adapts_gray_small_images(tiny_clip_weights):
    model, path = tiny_clip_weights
    spec = {"type": "open_clip_visual", "model": "mneme-tiny-clip", "weights": str(path)}
    enc = build_encoder("image", {**spec, "projection": "none"}, 64, (1, 8, 8))
    out = enc(torch.rand(3, 1, 8, 8))
    assert out.shape == (3, 64) and is_normalized(out)
    torch.testing.assert_close(enc.backbone.tower.conv1.weight, model.visual.conv1.weight)


def test_mel_filterbank_is_triangular_and_a_tone_peaks_in_its_band():
    sample_rate, n_fft, n_mels = 8000, 256, 40
    fb = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate)
    assert fb.shape == (129, n_mels) and fb.min() >= 0 and fb.max() <= 1
    assert (fb.sum(0) > 0).all()  # every band covers a frequency bin
    front = LogMel(sample_rate, n_fft, hop_length=64, n_mels=n_mels)
    peaks = []
    for freq in (300.0, 1000.0, 3000.0):
        t = torch.arange(8000) / sample_rate
        spec = front(torch.sin(2 * math.pi * freq * t)[None])
        assert spec.shape == (1, 1, n_mels, front.frames(8000))
        peaks.append(int(spec[0, 0].mean(1).argmax()))
    assert peaks == sorted(peaks) and len(set(peaks)) == 3  # higher tone, higher band
    # the band of the peak contains the tone: its filter's weight at the tone's bin is high
    bin_1k = round(1000.0 / (sample_rate / n_fft))
    assert fb[bin_1k, peaks[1]] == fb[bin_1k].max()


def test_audio_encoder_on_int16_pcm_and_local_weights(tmp_path):
    spec = {"model": "mneme_cnn", "args": {"widths": [8, 16]}, "n_mels": 20}
    enc = build_encoder("audio", spec, D, (8000,))
    wave = (torch.randn(4, 8000) * 3000).to(torch.int16)
    out = enc(wave)
    assert out.shape == (4, D) and is_normalized(out)
    path = tmp_path / "audio.pt"
    torch.save(enc.backbone.backbone.state_dict(), path)
    loaded = build_encoder("audio", {**spec, "weights": str(path)}, D, (8000,))
    loaded.projection.load_state_dict(enc.projection.state_dict())
    enc.eval(), loaded.eval()
    torch.testing.assert_close(loaded(wave), enc(wave))


@pytest.mark.parametrize(
    ("modality", "spec", "field"),
    [
        ("image", {"type": "nope"}, "model.encoders.image.type"),
        ("image", {"model": "mneme_mlp", "colour": 1}, "model.encoders.image"),
        ("text", {"model": "no-such-clip"}, "model.encoders.*.model"),
        ("image", {"model": "mneme_mlp", "projection": "none"}, "model.encoders.image.projection"),
    ],
)
def test_bad_encoder_specs_name_the_field(modality, spec, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("*", r"\*")):
        build_encoder(modality, spec, D, (1, 8, 8))


# -- the loss ---------------------------------------------------------------------------------
def embeddings(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(2))


def test_clip_loss_is_symmetric_cross_entropy_of_scaled_cosines():
    a, b = embeddings()
    scale = torch.tensor(7.0)
    sim = [[float(scale) * float(a[i] @ b[j]) for j in range(6)] for i in range(6)]

    def ce(rows):  # -log softmax at the diagonal, averaged, by hand
        return (
            sum(math.log(sum(math.exp(x) for x in row)) - row[i] for i, row in enumerate(rows)) / 6
        )

    columns = [list(col) for col in zip(*sim, strict=True)]
    expected = (ce(sim) + ce(columns)) / 2
    assert AlignmentLoss()(a, b, scale).item() == pytest.approx(expected, rel=1e-5)


def test_label_aware_loss_averages_log_probabilities_over_same_class_pairs():
    a, b = embeddings()
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    scale = torch.tensor(5.0)
    sim = [[float(scale) * float(a[i] @ b[j]) for j in range(6)] for i in range(6)]

    def direction(rows):
        total = 0.0
        for i, row in enumerate(rows):
            log_z = math.log(sum(math.exp(x) for x in row))
            positives = [j for j in range(6) if labels[j] == labels[i]]
            total += -sum(row[j] - log_z for j in positives) / len(positives)
        return total / 6

    columns = [list(col) for col in zip(*sim, strict=True)]
    expected = (direction(sim) + direction(columns)) / 2
    assert AlignmentLoss()(a, b, scale, labels).item() == pytest.approx(expected, rel=1e-5)
    # distinct labels: exactly the CLIP loss
    distinct = AlignmentLoss()(a, b, scale, torch.arange(6))
    torch.testing.assert_close(distinct, AlignmentLoss()(a, b, scale))


# -- metrics ----------------------------------------------------------------------------------
def test_recall_at_k_in_both_directions_on_hand_made_embeddings():
    a = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0.1]]))
    # b: item 0 pairs right; item 1 is nearest to a[2]; item 2 nearest a[1]; item 3 far away
    b = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 0.2, 1, 0], [0, 1, 0.2, 0], [-1, 0, 0, 0.1]]))
    metric = CrossModalRecall(ks=(1, 2, 4))
    metric.update(a[:2], b[:2])
    metric.update(a[2:], b[2:])  # states accumulate across batches
    a_to_b, b_to_a = metric.compute()
    # a->b ranks of the paired item: 0, 1, 1, 3 (a[3] is nearest b[0], farthest from b[3])
    torch.testing.assert_close(a_to_b, torch.tensor([1 / 4, 3 / 4, 1.0]))
    sims = a @ b.T
    ranks_t = [(sims[:, i] > sims[i, i]).sum().item() for i in range(4)]
    torch.testing.assert_close(
        b_to_a, torch.tensor([sum(r < k for r in ranks_t) / 4 for k in (1, 2, 4)])
    )
    by_label = CrossModalRecall(ks=(1,), by_label=True)
    by_label.update(
        a, b, torch.tensor([0, 1, 1, 2])
    )  # 1 and 2 share a class: both hit; a[3] misses
    assert by_label.compute()[0].item() == pytest.approx(3 / 4)


def test_class_embeddings_are_renormalized_means_of_normalized_templates():
    encoder = torch.nn.Identity()  # "tokens" are embeddings here
    tokens = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 2.0]]])  # (C=2, T=2, 2)
    weights = class_embeddings(encoder, tokens)
    torch.testing.assert_close(weights[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))
    torch.testing.assert_close(weights[1], F.normalize(torch.tensor([1.0, 1.0]), dim=0))


def test_zero_shot_accuracy_fills_experience_accuracy():
    from mneme.app.core.metrics import ExperienceAccuracy
    from mneme.app.models.aligner import ContrastiveAligner

    module = ContrastiveAligner(
        encoders={"image": {"model": "mneme_mlp", "args": {"hidden": [8]}}, "text": {}},
        embed_dim=8,
        input_shapes={"image": (1, 8, 8), "text": (16,)},
        num_classes=3,
    )
    module.set_prompts(["zero", "one", "two"], ["a {}"])
    module.experience_accuracy = ExperienceAccuracy(2)
    module.other_zero_shot = torch.nn.ModuleDict()
    # Hand-made embeddings: image i embeds exactly as class prompt (i % 3).
    weights = module.class_embeddings().detach()
    labels = torch.tensor([0, 1, 2, 0])
    module.embed = lambda batch, modalities=None: {
        "image": weights[torch.tensor([0, 1, 2, 1])],  # the last one is wrong
        "text": weights[labels],
    }
    batch = {"image": torch.zeros(4, 1, 8, 8), "text": torch.zeros(4, 16).long(), "label": labels}
    module.eval().validation_step(batch, 0, dataloader_idx=1)
    accuracy = module.experience_accuracy.compute()
    assert math.isnan(accuracy[0]) and accuracy[1].item() == pytest.approx(3 / 4)
    assert module.recall["image_text"].compute()[0, 0].item() == pytest.approx(3 / 4)


# -- callbacks and continual strategies through Lightning -------------------------------------
def test_aligner_trains_with_replay_ewc_and_feature_distillation(tmp_path):
    from lightning.pytorch import Trainer
    from mneme.app.models.aligner import ContrastiveAligner
    from mneme.callbacks import EWC, ContinualMetrics, FeatureDistillation, Replay
    from mneme.datamodules import ContinualDataModule

    torch.manual_seed(0)
    data = ContinualDataModule(
        "mneme.datamodules.SplitCaptionedDigits",
        {"n_experiences": 2},
        batch_size=128,
    )
    module = ContrastiveAligner(
        encoders={"image": {"model": "mneme_mlp", "args": {"hidden": [32]}}, "text": {}},
        embed_dim=16,
        label_aware=True,
    )
    distill = FeatureDistillation(alpha=1.0, prompt_alpha=1.0)
    callbacks = [ContinualMetrics(print_table=False), Replay(buffer_size=40), EWC(10.0), distill]
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        **data.trainer_settings(),
    )
    trainer.fit(module, data)
    assert len(callbacks[0].rows) == 2 and all(0 <= a <= 1 for a in callbacks[0].rows[-1])
    assert len(callbacks[1]) == 40 and set(callbacks[1].buffer) == {
        "image",
        "label",
        "text",
        "task",
    }
    assert callbacks[2].experiences == [0, 1]
    logged = trainer.logged_metrics
    assert {
        "train/loss_ewc",
        "train/loss_feature_distillation",
        "val/recall@1_image_to_text",
    } <= set(logged)
    assert 0 <= module.logit_scales["image_text"].item() <= math.log(100)
    # the teacher is state of the callback, tensors only; a fresh callback restores it
    state = distill.state_dict()
    assert state["experience"] == 1 and all(torch.is_tensor(v) for v in state["teacher"].values())
    restored = FeatureDistillation(alpha=1.0, prompt_alpha=1.0)
    restored.load_state_dict(state)
    restored.on_train_start(trainer, module)
    batch = {k: v[:8] for k, v in data.train_experiences[1].tensors.items()}
    with torch.no_grad():
        emb = module.embed(batch, ["image", "text"])
        assert restored.distillation(batch, {"embeddings": emb}) == pytest.approx(
            distill.distillation(batch, {"embeddings": emb}).item(), abs=1e-6
        )


# -- the CLI end to end -----------------------------------------------------------------------
def test_align_digits_config_fits_through_the_cli(quick_run):
    # conftest's session run of the config (the console script, one thread, shared with
    # test_expected_results, which checks its documented figures)
    result = quick_run("align_digits")
    log_dir = result["log_dir"]
    metrics = json.loads((log_dir / "continual_metrics.json").read_text())
    matrix = metrics["accuracy_matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
    assert matrix[0][0] > 0.3  # above chance (0.1) on the first experience
    assert "Accuracy matrix" in result["stdout"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("val/recall@1_image_to_text", "val/recall@10_text_to_image", "train/loss"):
        assert tag in scalars, tag
    assert (log_dir / "projector_config.pbtxt").is_file()


def test_bad_aligner_config_names_the_field():
    from mneme.app.models.aligner import ContrastiveAligner

    with pytest.raises(ValueError, match=r"model\.pairs"):
        ContrastiveAligner(pairs=[["image", "audio"]])
    with pytest.raises(ValueError, match=r"model\.encoders: zero-shot"):
        ContrastiveAligner(encoders={"image": {}, "audio": {}})


def test_benchmark_replaces_only_its_results_section(tmp_path):
    from benchmarks.align_throughput import write_section

    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Results\n\n## Other\n\nkeep me\n\n## Alignment throughput\n\nold\n\n## Tail\n\nx\n"
    )
    write_section("## Alignment throughput\n\nnew\n", path)
    text = path.read_text()
    assert "old" not in text and "new" in text and "keep me" in text and "## Tail\n\nx" in text
    write_section("## Alignment throughput\n\nnewer\n", path)
    assert path.read_text().count("## Alignment throughput") == 1
