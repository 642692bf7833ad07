"""Pretrained backbone input: the model's own data config, after undoing a stream's own
standardization."""

import torch
from mneme.app.nn.backbones import PretrainedInput
from mneme.datamodules import ContinualDataModule

from tests.conftest import MNIST_NPZ, needs_mnist

CONFIG = {"input_size": (3, 16, 16), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_a_standardized_stream_reaches_the_backbone_as_unit_range_images_would():
    x = torch.rand(2, 1, 8, 8)
    mean, std = 0.1307, 0.3081
    expected = PretrainedInput(CONFIG)(x)
    assert torch.allclose(
        PretrainedInput(CONFIG, (mean, std))((x - mean) / std), expected, atol=1e-6
    )
    assert expected.shape == (2, 3, 16, 16)
    assert torch.allclose(expected[:, 0].mean(), ((x.mean() - 0.485) / 0.229), atol=0.05)


@needs_mnist
def test_the_mnist_file_stream_declares_its_standardization():
    datamodule = ContinualDataModule(
        benchmark="mneme.datamodules.SplitMNISTFile", benchmark_args={"path": str(MNIST_NPZ)}
    )
    assert datamodule.input_normalization == (0.1307, 0.3081)


def test_a_per_channel_standardization_is_undone_per_channel():
    x = torch.rand(2, 3, 8, 8)
    mean, std = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]
    standardized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    undone = PretrainedInput(CONFIG, (mean, std))(standardized)
    assert torch.allclose(undone, PretrainedInput(CONFIG)(x), atol=1e-5)
