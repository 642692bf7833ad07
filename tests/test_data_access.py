"""Strategies read experiences through the datamodule: ``materialize: false`` reads nothing
up front, each strategy reads only the samples it uses, and both data paths train alike."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from mneme.app import ContinualClassifier
from mneme.callbacks import EWC, LwF, Replay
from mneme.datamodules import ContinualDataModule
from mneme.datamodules.data.experiences import DatasetExperience, TensorExperience
from torch.utils.data import Dataset

from tests.conftest import digits_stream, quiet_trainer

EPOCHS, BUFFER, FISHER = 2, 24, 16


class FileDigits(Dataset):
    """Each sample in its own ``.npy`` file, loaded when asked for and never kept; every
    read is counted by file."""

    def __init__(self, folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
        self.paths = []
        for i, image in enumerate(images):
            path = folder / f"{i}.npy"
            np.save(path, image)
            self.paths.append(path)
        self.targets = labels.tolist()  # what Avalanche's generators read: no file is opened
        self.reads: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        self.reads[index] += 1
        return torch.from_numpy(np.load(self.paths[index])), self.targets[index]


def file_stream(tmp_path: Path):
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from mneme.datamodules.streams.digits import load_digits_tensors

    train, test = load_digits_tensors()
    datasets = []
    for name, part in (("train", train), ("test", test)):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        datasets.append(FileDigits(folder, part.inputs.numpy(), np.array(part.targets)))
    scenario = nc_benchmark(*datasets, n_experiences=2, task_labels=False, seed=0)
    return scenario, datasets


def fit(datamodule: ContinualDataModule, tmp_path: Path, seed: int = 0):
    torch.manual_seed(seed)
    callbacks = [
        Replay(buffer_size=BUFFER, policy="class_balanced"),
        EWC(ewc_lambda=10.0, fisher_samples=FISHER),
        LwF(alpha=0.5),
    ]
    trainer = quiet_trainer(datamodule, tmp_path, callbacks)
    model = ContinualClassifier(encoder="mneme_mlp")
    trainer.fit(model, datamodule)
    return model, callbacks


def file_datamodule(tmp_path: Path, materialize: bool):
    scenario, datasets = file_stream(tmp_path)
    datamodule = ContinualDataModule(
        epochs_per_experience=EPOCHS, batch_size=32, materialize=materialize
    )
    # The stream is built here, not named by import path: it is local to this test.
    datamodule.factory = lambda: scenario
    datamodule.benchmark_args = {}
    return datamodule, datasets


def test_materialize_false_reads_nothing_up_front_and_only_what_strategies_use(tmp_path):
    datamodule, (train, test) = file_datamodule(tmp_path, materialize=False)
    assert all(isinstance(e, DatasetExperience) for e in datamodule.train_experiences)
    assert datamodule.num_classes == 10 and datamodule.field_shape("image") == (1, 8, 8)
    assert sum(train.reads.values()) <= 1 and not test.reads  # one sample gave the shape

    fit(datamodule, tmp_path)
    # Training reads every sample once per epoch; Replay reads only what it keeps and
    # EWC only its Fisher samples (at most once each per experience); nothing else.
    n = len(train)
    assert set(train.reads) == set(range(n))
    assert all(EPOCHS <= r <= EPOCHS + 3 for r in train.reads.values()), train.reads
    extra = sum(train.reads.values()) - EPOCHS * n
    experiences = datamodule.num_experiences
    assert 0 < extra <= experiences * (BUFFER + FISHER) + 1, extra
    # Each validation pass (the sanity pass, then one per experience end) reads each test
    # sample once.
    assert set(test.reads.values()) == {1 + experiences}


def test_both_data_paths_train_the_same_model(tmp_path):
    materialized, _ = file_datamodule(tmp_path / "a", materialize=True)
    on_demand, _ = file_datamodule(tmp_path / "b", materialize=False)
    assert isinstance(materialized.train_experiences[0], TensorExperience)
    a, (replay_a, ewc_a, _) = fit(materialized, tmp_path / "a")
    b, (replay_b, ewc_b, _) = fit(on_demand, tmp_path / "b")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    for key, value in replay_a.buffer.items():
        assert torch.equal(value, replay_b.buffer[key]), key
    assert all(torch.equal(x, y) for x, y in zip(ewc_a.fishers, ewc_b.fishers, strict=True))


@pytest.mark.parametrize("materialize", [True, False])
def test_experience_metadata_needs_no_sample(materialize):
    datamodule = ContinualDataModule(**digits_stream(5), materialize=materialize)
    experience = datamodule.train_experiences[1]
    assert experience.classes == sorted(experience.labels().unique().tolist())
    assert torch.equal(experience.task_labels(), torch.zeros(len(experience), dtype=torch.long))
    index = torch.tensor([3, 0, 7])
    batch = experience.read(index)
    assert torch.equal(batch["label"], experience.labels()[index])
    assert [len(b["label"]) for b in experience.batches(4)] == [4] * (len(experience) // 4) + (
        [len(experience) % 4] if len(experience) % 4 else []
    )


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize(
    ("keys", "reason"),
    [(["label", "image", "task"], "not a class index"), (["image", "task", "label"], "not the")],
)
def test_sample_keys_in_the_wrong_order_are_refused(tmp_path, materialize, keys, reason):
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from mneme.datamodules import ConfigError
    from mneme.datamodules.streams.digits import load_digits_tensors

    # an Avalanche scenario, which does not declare its fields: sample_keys names them
    scenario = nc_benchmark(*load_digits_tensors(), n_experiences=5, task_labels=False, seed=0)
    datamodule = ContinualDataModule(sample_keys=keys, materialize=materialize)
    datamodule.factory, datamodule.benchmark_args = (lambda: scenario), {}
    with pytest.raises(ConfigError, match=f"data.sample_keys: position .*{reason}"):
        datamodule.field_shape("image")


def test_sample_keys_that_contradict_a_declared_stream_are_refused():
    from mneme.datamodules import ConfigError

    datamodule = ContinualDataModule(**digits_stream(5), sample_keys=["image", "task", "label"])
    with pytest.raises(ConfigError, match="data.sample_keys: .* contradicts the fields"):
        datamodule.field_shape("image")
    assert ContinualDataModule(**digits_stream(5)).sample_keys == ["image", "label", "task"]


def test_a_label_past_max_classes_is_refused_before_a_head_is_sized():
    from mneme.datamodules import ConfigError

    with pytest.raises(ConfigError, match="data.max_classes: must be at least 1"):
        ContinualDataModule(**digits_stream(5), max_classes=0)
    with pytest.raises(ConfigError, match="data.max_classes: the stream's largest label is 9"):
        ContinualDataModule(**digits_stream(5), max_classes=5).num_classes  # noqa: B018
