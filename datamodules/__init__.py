"""LightningDataModules that serve Avalanche benchmark streams, and offline built-in streams."""

from mneme.datamodules.captioned_digits import SplitCaptionedDigits
from mneme.datamodules.continual import ContinualDataModule, experience_of
from mneme.datamodules.csv_captions import CSVCaptions
from mneme.datamodules.spoken_digits import SpokenDigits
from mneme.datamodules.streams import PermutedMNISTFile, SplitDigits, SplitMNISTFile
from mneme.datamodules.tensor_batches import TensorBatches

__all__ = [
    "CSVCaptions",
    "SplitCaptionedDigits",
    "SpokenDigits",
    "ContinualDataModule",
    "PermutedMNISTFile",
    "SplitDigits",
    "SplitMNISTFile",
    "TensorBatches",
    "experience_of",
]
