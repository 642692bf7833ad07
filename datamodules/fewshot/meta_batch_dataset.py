"""The dataset and sampler behind the loaders of
:class:`~mneme.datamodules.fewshot.datamodule.EpisodicDataModule`: one rank's meta-batches
of a split and setting, drawn by seed (:class:`MetaBatches`), and the ``(epoch, b)`` keys a
loader asks them with (:class:`EpochKeys`). How a model reads the meta-batches:
:mod:`mneme.datamodules.fewshot.meta_batches`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from mneme.datamodules.data.tensor_batches import EpochSampler
from mneme.datamodules.fewshot.episodes import (
    EpisodeSampler,
    SamplePool,
    episode_batch,
    episode_seed,
    rank_episodes,
)
from torch.utils.data import Dataset


class MetaBatches(Dataset):
    """One rank's meta-batches of one split and setting: item ``(epoch, b)`` is meta-batch
    ``b`` (``tasks_per_batch`` episodes) of ``epoch`` (ignored by evaluation splits).

    Episode ``i`` is drawn from its own generator, seeded by :func:`episode_seed` from
    ``(seed, split, key, i)``; ``key`` is ``(epoch,)`` for training and the setting
    ``(n_way, k_shot, q_queries)`` for evaluation. ``episodes`` and ``padded`` are this
    rank's episode indices (:func:`rank_episodes`).
    """

    def __init__(
        self,
        pool: SamplePool,
        sampler: EpisodeSampler,
        fields: Sequence[str],
        split: str,
        setting: tuple[int, int, int],
        seed: int,
        num_episodes: int,
        tasks_per_batch: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.pool, self.sampler, self.fields = pool, sampler, list(fields)
        self.split, self.setting, self.seed = split, setting, seed
        self.tasks_per_batch = tasks_per_batch
        pad = "fresh" if split == "train" else "repeat"
        self.episodes, self.padded = rank_episodes(num_episodes, rank, world_size, pad)

    def __len__(self) -> int:
        return math.ceil(len(self.episodes) / self.tasks_per_batch)

    def episode(self, index: int, epoch: int = 0):
        """Episode ``index``: ``(support_index, query_index, classes)`` into the pool."""
        key = (epoch,) if self.split == "train" else self.setting
        generator = torch.Generator().manual_seed(episode_seed(self.seed, self.split, key, index))
        return self.sampler.sample(*self.setting, generator)

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        epoch, b = item if isinstance(item, tuple) else (0, item)
        span = slice(b * self.tasks_per_batch, (b + 1) * self.tasks_per_batch)
        ids = self.episodes[span]
        batch = episode_batch(self.pool, [self.episode(i, epoch) for i in ids], self.fields)
        batch["episode"] = torch.tensor(ids, dtype=torch.long)
        batch["padded"] = torch.tensor(self.padded[span], dtype=torch.bool)
        return batch


class EpochKeys(EpochSampler):
    """Yields ``(epoch, b)`` keys, the epoch read when iteration starts (Lightning's running
    epoch then, so a loader built once serves fresh episodes every epoch). A
    ``DistributedSampler`` subclass so that Lightning keeps it under DDP."""

    def __init__(self, num_batches: int, epoch: Callable[[], int]) -> None:
        super().__init__(torch.arange(num_batches))
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch()
        return iter([(epoch, b) for b in range(len(self))])
