"""Serve dict batches from tensors held in memory.

Avalanche datasets pay Python overhead per sample (``__getitem__``, transforms, collate).
When an experience fits in memory we materialize it once as contiguous tensors and cut
batches by index: one ``index_select`` per key and batch. No maintained library offers a
rank-aware, epoch-seeded index loader over a dict of tensors, so it is written here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

Batch = dict[str, Tensor]


class TensorBatches:
    """An iterable of dict batches over in-memory tensors that share their first dimension.

    Args:
        tensors: ``{key: tensor}``, all with the same length along dim 0.
        batch_size: samples per batch (per rank).
        shuffle: draw a new permutation each epoch, seeded by ``(seed, epoch)`` so that a
            resumed run sees the same order as an uninterrupted one.
        seed: base seed of the permutation.
        epoch: the epoch this loader serves (part of the seed).
        rank, world_size: this process's shard. ``pad_shards=True`` repeats samples so
            every rank gets the same number of batches (as ``DistributedSampler`` does,
            needed for training under DDP); ``False`` gives disjoint shards of unequal size
            (exact evaluation: metrics are summed across ranks).
        drop_last: drop the last incomplete batch.

    Example::

        loader = TensorBatches({"image": x, "label": y}, batch_size=64, shuffle=True, epoch=3)
        for batch in loader:
            logits = model(batch["image"])
    """

    def __init__(
        self,
        tensors: Batch,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_shards: bool = True,
        drop_last: bool = False,
    ) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all tensors must have the same length, got {lengths}")
        self.tensors = tensors
        self.num_samples = lengths.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.pad_shards = pad_shards
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = shard_size(self.num_samples, self.rank, self.world_size, self.pad_shards)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def indices(self) -> Tensor:
        """This rank's sample indices for this epoch, in serving order."""
        return epoch_order(
            self.num_samples,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            pad_shards=self.pad_shards,
        )

    def __iter__(self) -> Iterator[Batch]:
        order = self.indices()
        device = next(iter(self.tensors.values())).device
        order = order.to(device)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield {key: value.index_select(0, index) for key, value in self.tensors.items()}


def shard_size(num_samples: int, rank: int, world_size: int, pad_shards: bool) -> int:
    """Samples a rank serves: equal shards (padded by repeats), or disjoint ones."""
    if world_size == 1:
        return num_samples
    if pad_shards:
        return math.ceil(num_samples / world_size)
    return len(range(rank, num_samples, world_size))


def epoch_order(
    num_samples: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    pad_shards: bool = True,
) -> Tensor:
    """A rank's sample indices for an epoch: a permutation seeded by ``(seed, epoch)``
    (so a resumed run sees the order an uninterrupted one saw), sharded across ranks."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_samples, generator=generator)
    else:
        order = torch.arange(num_samples)
    if world_size > 1:
        if pad_shards:
            total = shard_size(num_samples, rank, world_size, pad_shards) * world_size
            order = order.repeat(math.ceil(total / max(num_samples, 1)))[:total]
        order = order[rank::world_size]
    return order


class EpochSampler(DistributedSampler):
    """Serves a fixed ``order`` (from :func:`epoch_order`) to a per-sample ``DataLoader``
    (``materialize: false``), so both data paths serve the same batches and resume alike.

    It subclasses ``DistributedSampler`` only so that Lightning keeps it as it is: Lightning
    replaces any other sampler with its own distributed one under DDP, whose padding and
    seeding differ. That is the documented way (``Trainer(use_distributed_sampler=...)``: "a
    distributed sampler already added is not replaced"); ``use_distributed_sampler=False``
    would do it too, but it is the Trainer's setting, which a datamodule cannot make, and a
    Trainer built without it (the Python API, the tests) would shard the shards again.
    Lightning's ``set_epoch`` calls are ignored: the epoch is fixed when the loader is built,
    each epoch (``reload_dataloaders_every_n_epochs=1``).
    """

    def __init__(self, order: Tensor) -> None:
        # The base class only needs a sized dataset; no process group is read.
        super().__init__(range(len(order)), num_replicas=1, rank=0, shuffle=False)
        self.order = order

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        pass
