"""MMDAdaptation: the multi-kernel unbiased MMD, the loss term toward the next experience,
bad inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mneme.app import ContinualClassifier
from mneme.callbacks import MMDAdaptation
from mneme.callbacks.strategies.mmd import mmd2
from mneme.datamodules import ConfigError
from mneme.datamodules.data.experiences import TensorExperience
from mneme.datamodules.streams.registry import stream


def hand_mmd2(x, y, multipliers):
    """The unbiased estimate by loops (Gretton et al. 2012, eq. 3)."""
    pooled = torch.cat([x, y])
    d2 = [
        ((a - b) ** 2).sum().item()
        for i, a in enumerate(pooled)
        for j, b in enumerate(pooled)
        if i != j
    ]
    median = torch.tensor(d2).median().item()

    def k(a, b):
        return sum(torch.exp(-((a - b) ** 2).sum() / (m * median)) for m in multipliers)

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g) + 0.5
    torch.testing.assert_close(mmd2(x, y, (0.5, 1, 2)), hand_mmd2(x, y, (0.5, 1, 2)))


def test_mmd_near_zero_for_one_distribution_positive_for_shifted():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    same = mmd2(x, y).item()
    shifted = mmd2(x, y + 1.0).item()
    assert abs(same) < 0.01
    assert shifted > 0.2 and shifted > 20 * abs(same)
    with pytest.raises(ConfigError, match="at least 2 samples"):
        mmd2(x[:1], y)


def tiny_model() -> ContinualClassifier:
    torch.manual_seed(0)
    model = ContinualClassifier(
        encoder="mneme_mlp", encoder_args={"hidden": [6]}, num_classes=2, input_shape=(1, 2, 2)
    )
    model.observe_experience([0, 1], [0])
    return model


def experience(n: int, shift: float, seed: int) -> TensorExperience:
    g = torch.Generator().manual_seed(seed)
    return TensorExperience(
        {
            "image": torch.randn(n, 1, 2, 2, generator=g) + shift,
            "label": torch.arange(n) % 2,
            "task": torch.zeros(n, dtype=torch.long),
        }
    )


def fake_trainer(experiences, epoch=0, batch_size=8):
    data = SimpleNamespace(
        train_experiences=experiences,
        epochs_per_experience=1,
        num_experiences=len(experiences),
        batch_size=batch_size,
    )
    return SimpleNamespace(
        datamodule=data, current_epoch=epoch, global_step=3, global_rank=0, world_size=1
    )


def test_loss_term_draws_the_next_experience_and_trains_the_encoder():
    model = tiny_model()
    stream = [experience(20, 0.0, 0), experience(20, 3.0, 1)]
    mmd = MMDAdaptation(lambda_=2.0, target_batch_size=6, seed=0)
    mmd._trainer, mmd._module = fake_trainer(stream), model
    mmd.on_fit_start(mmd._trainer, model)
    batch = stream[0].read(torch.arange(8))
    outputs = {"features": model.features(batch["image"])}
    loss = mmd.mmd_loss(batch, outputs)
    # the same draw by hand: 6 of experience 1, from (seed 0, rank 0, step 3)
    from mneme.app.core.seeding import keyed_generator

    index = torch.randperm(20, generator=keyed_generator(0, 0, 3))[:6]
    target = model.features(stream[1].read(index)["image"])
    torch.testing.assert_close(loss, 2.0 * mmd2(outputs["features"], target))
    assert loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    # the last experience has no next one: zero
    mmd._trainer = fake_trainer(stream, epoch=1)
    assert mmd.mmd_loss(batch, outputs).item() == 0.0


@pytest.mark.parametrize(
    "args, field",
    [
        ({"lambda_": 0}, "MMDAdaptation.lambda_"),
        ({"target_batch_size": 1}, "MMDAdaptation.target_batch_size"),
        ({"multipliers": [1.0, -2.0]}, "MMDAdaptation.multipliers"),
    ],
)
def test_bad_arguments(args, field):
    with pytest.raises(ConfigError, match=field):
        MMDAdaptation(**args)


def test_bad_streams():
    model = tiny_model()
    one = [experience(10, 0.0, 0)]
    with pytest.raises(ConfigError, match="no next domain"):
        MMDAdaptation().on_fit_start(fake_trainer(one), model)
    split = [experience(10, 0.0, 0), experience(10, 0.0, 1)]
    split[1].classes = [2, 3]
    with pytest.raises(ConfigError, match="domain-incremental"):
        MMDAdaptation().on_fit_start(fake_trainer(split), model)
    same = [experience(10, 0.0, 0), experience(10, 0.0, 1)]
    with pytest.raises(ConfigError, match="data.batch_size"):
        MMDAdaptation().on_fit_start(fake_trainer(same, batch_size=1), model)


@stream
def PermutedDigits(n_experiences: int = 2, seed: int = 0):  # noqa: N802 - a stream factory
    """Domain-incremental 8x8 digits (one pixel permutation per experience), built as
    PermutedMNISTFile builds its stream: a small, offline stream for an MMD fit."""
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from mneme.datamodules.streams.declared import DeclaredStream
    from mneme.datamodules.streams.digits import LabeledTensors, load_digits_tensors

    train, test = load_digits_tensors(test_size=0.25, seed=0)
    g = torch.Generator().manual_seed(seed)
    trains, tests = [], []
    for _ in range(n_experiences):
        perm = torch.randperm(train.inputs[0].numel(), generator=g)
        for source, out in ((train, trains), (test, tests)):
            flat = source.inputs.flatten(1)[:, perm].view_as(source.inputs)
            out.append(LabeledTensors(flat, torch.tensor(source.targets)))
    scenario = nc_benchmark(
        trains,
        tests,
        n_experiences=n_experiences,
        task_labels=False,
        shuffle=False,
        class_ids_from_zero_in_each_exp=True,
        one_dataset_per_exp=True,
    )
    return DeclaredStream(scenario)


def test_fit_on_permuted_digits_and_resume_from_the_boundary(tmp_path):
    """MMD's target draws derive from (seed, rank, step), nothing to checkpoint: a run resumed
    from the end of experience 0 trains to the uninterrupted run's model."""
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from mneme.datamodules import ContinualDataModule

    def run(ckpt_path=None, ckpt_dir=None):
        seed_everything(0)
        model = ContinualClassifier(
            encoder="mneme_mlp",
            encoder_args={"hidden": [8]},
            optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        )
        data = ContinualDataModule(
            "tests.test_mmd.PermutedDigits",
            {"n_experiences": 2},
            epochs_per_experience=1,
            batch_size=128,
        )
        mmd = MMDAdaptation(lambda_=1.0, target_batch_size=16)
        watch = Watch()
        extra = [] if ckpt_dir is None else [ModelCheckpoint(ckpt_dir, save_top_k=-1)]
        trainer = Trainer(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=ckpt_dir is not None,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[mmd, watch, *extra],
            **data.trainer_settings(),
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, watch.terms

    class Watch(Callback):  # the MMD term of each step
        def __init__(self):
            self.terms = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.terms.append(float(pl_module.last_loss_terms["mmd"]))

    full, terms = run(ckpt_dir=tmp_path / "ckpt")
    half = len(terms) // 2
    assert all(t > 0 for t in terms[:half]) and all(t == 0 for t in terms[half:])
    boundary = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed, _ = run(ckpt_path=boundary)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, full.state_dict()[key])


def test_aligner_aligns_the_input_modalitys_embeddings():
    """For a ContrastiveAligner the term compares the zero-shot modality's embeddings (audio
    here) of the batch and of the next domain's clips."""
    from tests.test_augmentation import audio_batch, tiny_audio_aligner

    module = tiny_audio_aligner().train()
    stream = []
    for seed in (0, 1):
        b = audio_batch(9)
        b["audio"] = (b["audio"].float() * (1 + 2 * seed)).clamp(-32768, 32767).short()
        stream.append(TensorExperience({**b, "task": torch.zeros(9, dtype=torch.long)}))
    mmd = MMDAdaptation(lambda_=1.0, target_batch_size=4, seed=0)
    mmd._trainer, mmd._module = fake_trainer(stream), module
    mmd.on_fit_start(mmd._trainer, module)
    batch = stream[0].read(torch.arange(6))
    outputs = {"embeddings": module.embed(batch, ["audio"])}
    loss = mmd.mmd_loss(batch, outputs)
    from mneme.app.core.seeding import keyed_generator

    index = torch.randperm(9, generator=keyed_generator(0, 0, 3))[:4]
    target = module.embed(stream[1].read(index), ["audio"])["audio"]
    torch.testing.assert_close(loss, mmd2(outputs["embeddings"]["audio"], target))
    loss.backward()
    assert any(p.grad is not None for p in module.encoders["audio"].parameters())
    with pytest.raises(ConfigError, match="MMDAdaptation needs a FeatureClassifier"):
        MMDAdaptation().on_fit_start(fake_trainer(stream), torch.nn.Linear(2, 2))
