"""LightningDataModules that serve Avalanche benchmark streams, and offline built-in streams."""

from datamodules.captioned_digits import SplitCaptionedDigits
from datamodules.continual import ContinualDataModule, experience_of
from datamodules.csv_captions import CSVCaptions
from datamodules.spoken_digits import SpokenDigits
from datamodules.streams import PermutedMNISTFile, SplitDigits, SplitMNISTFile
from datamodules.tensor_batches import TensorBatches

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
