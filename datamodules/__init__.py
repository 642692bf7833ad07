"""LightningDataModules that serve Avalanche benchmark streams, and offline built-in streams."""

from datamodules.continual import ContinualDataModule, experience_of
from datamodules.streams import PermutedMNISTFile, SplitDigits, SplitMNISTFile
from datamodules.tensor_batches import TensorBatches

__all__ = [
    "ContinualDataModule",
    "PermutedMNISTFile",
    "SplitDigits",
    "SplitMNISTFile",
    "TensorBatches",
    "experience_of",
]
