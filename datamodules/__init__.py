"""LightningDataModules that serve Avalanche benchmark streams, and offline built-in streams.

Exports resolve lazily (PEP 562): ``mneme.datamodules.errors`` and ``schedule`` are light,
and importing them (the CLI does, for ``mneme --help``) must not import Avalanche.
"""

import importlib

_EXPORTS = {
    "CSVCaptions": "mneme.datamodules.csv_captions",
    "CSVImageStream": "mneme.datamodules.file_stream",
    "ConfigError": "mneme.datamodules.errors",
    "ContinualDataModule": "mneme.datamodules.continual",
    "EpisodeSampler": "mneme.datamodules.episodes",
    "EpisodicDataModule": "mneme.datamodules.episodic",
    "ImageFolderStream": "mneme.datamodules.file_stream",
    "MnemeError": "mneme.datamodules.errors",
    "PermutedMNISTFile": "mneme.datamodules.streams",
    "SplitCaptionedDigits": "mneme.datamodules.captioned_digits",
    "SplitDigits": "mneme.datamodules.streams",
    "SplitMNISTFile": "mneme.datamodules.streams",
    "SpokenDigits": "mneme.datamodules.spoken_digits",
    "SpokenMNIST": "mneme.datamodules.paired",
    "TensorBatches": "mneme.datamodules.tensor_batches",
    "check_class_splits": "mneme.datamodules.episodes",
    "current_experience": "mneme.datamodules.schedule",
    "sample_episode": "mneme.datamodules.episodes",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
