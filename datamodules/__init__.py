"""LightningDataModules that serve Avalanche benchmark streams, and offline built-in streams.

Exports resolve lazily (PEP 562): ``mneme.app.core.errors`` and ``schedule`` are light,
and importing them (the CLI does, for ``mneme --help``) must not import Avalanche.
"""

import importlib

_EXPORTS = {
    "CSVCaptions": "mneme.datamodules.streams.csv_captions",
    "CSVImageStream": "mneme.datamodules.streams.csv_images",
    "ConfigError": "mneme.app.core.errors",
    "ContinualDataModule": "mneme.datamodules.continual",
    "EpisodeSampler": "mneme.datamodules.fewshot.episodes",
    "EpisodicDataModule": "mneme.datamodules.fewshot.datamodule",
    "ImageFolderStream": "mneme.datamodules.streams.image_folder",
    "MnemeError": "mneme.app.core.errors",
    "PermutedMNISTFile": "mneme.datamodules.streams.digits",
    "SplitCaptionedDigits": "mneme.datamodules.streams.captioned_digits",
    "SplitDigits": "mneme.datamodules.streams.digits",
    "SplitMNISTFile": "mneme.datamodules.streams.digits",
    "SpokenDigits": "mneme.datamodules.streams.spoken_digits",
    "SpokenMNIST": "mneme.datamodules.streams.paired",
    "TensorBatches": "mneme.datamodules.data.tensor_batches",
    "TextDomains": "mneme.datamodules.text.stream",
    "TextStream": "mneme.datamodules.text.stream",
    "check_block_size": "mneme.datamodules.text.tokenizer",
    "check_class_splits": "mneme.datamodules.fewshot.episodes",
    "current_experience": "mneme.app.core.schedule",
    "instruction_examples": "mneme.datamodules.text.stream",
    "sample_episode": "mneme.datamodules.fewshot.episodes",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
