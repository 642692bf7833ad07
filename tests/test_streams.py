"""Streams: sizes, classes per experience, task labels; the in-memory loader; bad specs."""

import numpy as np
import pytest
import torch
from mneme.datamodules import ContinualDataModule, TensorBatches
from mneme.datamodules.streams.registry import resolve_benchmark

from tests.conftest import MNIST_NPZ, digits_stream, needs_mnist


def test_split_digits_class_incremental():
    dm = ContinualDataModule(**digits_stream(5, seed=1))
    assert dm.num_experiences == 5 and dm.num_classes == 10 and dm.num_tasks == 1
    assert dm.field_shape("image") == (1, 8, 8)
    classes = [e.classes for e in dm.train_experiences]
    assert all(len(c) == 2 for c in classes)
    assert sorted(sum(classes, [])) == list(range(10))
    assert [e.classes for e in dm.test_experiences] == classes
    train = sum(len(e.tensors["label"]) for e in dm.train_experiences)
    test = sum(len(e.tensors["label"]) for e in dm.test_experiences)
    assert (train, test) == (1347, 450)  # 1,797 digits, 25% held out
    assert all(e.tasks == [0] for e in dm.train_experiences)


def test_split_digits_task_incremental_has_one_task_per_experience():
    dm = ContinualDataModule(**digits_stream(5, return_task_id=True))
    assert dm.num_tasks == 5
    assert [e.tasks for e in dm.train_experiences] == [[k] for k in range(5)]
    assert [e.tasks for e in dm.test_experiences] == [[k] for k in range(5)]


def test_seed_changes_class_order():
    def first_classes(seed):
        return ContinualDataModule(**digits_stream(5, seed=seed)).train_experiences[0].classes

    assert first_classes(0) != first_classes(3)


@needs_mnist
def test_split_mnist_file_uses_first_8000_rows_for_training():
    dm = ContinualDataModule("mneme.datamodules.SplitMNISTFile", {"path": str(MNIST_NPZ)})
    assert dm.field_shape("image") == (1, 28, 28) and dm.num_classes == 10
    assert sum(len(e.tensors["label"]) for e in dm.train_experiences) == 8000
    assert sum(len(e.tensors["label"]) for e in dm.test_experiences) == 2000
    labels = np.load(MNIST_NPZ)["labels"]
    first = dm.train_experiences[0]
    assert len(first.tensors["label"]) == np.isin(labels[:8000], first.classes).sum()


@needs_mnist
def test_permuted_mnist_file_is_domain_incremental():
    dm = ContinualDataModule(
        "mneme.datamodules.PermutedMNISTFile",
        {"path": str(MNIST_NPZ), "n_experiences": 3, "seed": 0},
    )
    assert dm.num_experiences == 3 and dm.num_tasks == 1
    assert all(e.classes == list(range(10)) for e in dm.train_experiences)
    x0, x1 = (e.tensors["image"] for e in dm.train_experiences[:2])
    assert x0.shape == x1.shape == (8000, 1, 28, 28)
    assert not torch.equal(x0, x1)  # another pixel permutation ...
    assert torch.allclose(x0.flatten(1).sort(1).values, x1.flatten(1).sort(1).values)  # ... only
    assert torch.equal(
        dm.train_experiences[0].tensors["label"], dm.train_experiences[1].tensors["label"]
    )


def test_tensor_batches_cover_each_sample_once_and_reshuffle_per_epoch():
    data = {"x": torch.arange(10), "label": torch.arange(10) % 3}
    batches = list(TensorBatches(data, 4, shuffle=True, seed=0, epoch=0))
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    order0 = torch.cat([b["x"] for b in batches])
    assert sorted(order0.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b["label"] for b in batches]), order0 % 3)  # keys stay paired
    again = torch.cat([b["x"] for b in TensorBatches(data, 4, shuffle=True, seed=0, epoch=0)])
    other = torch.cat([b["x"] for b in TensorBatches(data, 4, shuffle=True, seed=0, epoch=1)])
    assert torch.equal(order0, again) and not torch.equal(order0, other)


def test_tensor_batches_shards_across_ranks():
    data = {"x": torch.arange(11)}
    padded = [TensorBatches(data, 4, rank=r, world_size=2, pad_shards=True) for r in range(2)]
    assert [len(p) for p in padded] == [2, 2]
    shards = [torch.cat([b["x"] for b in p]) for p in padded]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(torch.cat(shards).tolist()) == set(range(11))
    exact = [TensorBatches(data, 4, rank=r, world_size=2, pad_shards=False) for r in range(2)]
    parts = [torch.cat([b["x"] for b in p]).tolist() for p in exact]
    assert sorted(parts[0] + parts[1]) == list(range(11))  # disjoint, nothing repeated


@pytest.mark.parametrize(
    "class_path, arguments, field",
    [
        ("avalanche.benchmarks.classic.NoSuchBenchmark", {}, "data.benchmark"),
        ("SplitDigits", {}, "data.benchmark"),
        ("mneme.datamodules.SplitDigits", {"n_exp": 5}, "data.benchmark_args"),
    ],
)
def test_bad_benchmark_names_the_field(class_path, arguments, field):
    with pytest.raises(ValueError, match=field):
        resolve_benchmark(class_path, arguments)


def test_avalanche_errors_name_the_field():
    dm = ContinualDataModule(**digits_stream(3))  # 10 classes do not split in 3
    with pytest.raises(ValueError, match="data.benchmark_args: .*n_experiences"):
        dm.prepare_data()


def test_classic_avalanche_benchmark_resolves_by_import_path():
    from avalanche.benchmarks.classic import SplitMNIST

    spec = ("avalanche.benchmarks.classic.SplitMNIST", {"n_experiences": 5})
    assert resolve_benchmark(*spec) is SplitMNIST
