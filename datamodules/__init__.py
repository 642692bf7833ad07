"""LightningDataModules that serve Avalanche benchmark streams, and offline built-in streams.

Exports resolve lazily (PEP 562): ``mneme.app.core.errors`` and ``schedule`` are light,
and importing them (the CLI does, for ``mneme --help``) must not import Avalanche.
"""

from mneme.app.core.lazy_exports import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
