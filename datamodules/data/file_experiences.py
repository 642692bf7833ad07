"""How a file stream serves its experiences: images decoded and augmented on demand, in
the DataLoader's workers (see :mod:`mneme.datamodules.streams.files` for the streams).

A sample's augmentation is seeded by ``(run seed, epoch, index)`` wherever it is decoded
(:func:`seeded`), so the batches are the same with 0 or N workers, persistent or not, and
after a resume; a worker's unreadable file is one :class:`ConfigError` line naming it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
from mneme.app.core.library_errors import dataloader_worker_message
from mneme.datamodules.data.experiences import ExperienceData, SampleCollate
from mneme.datamodules.data.file_transforms import TransformSpec, build_transform
from mneme.datamodules.data.tensor_batches import Batch, EpochSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

FIELDS = ("image", "label", "task")
ARGS = "data.benchmark_args"


@dataclass(frozen=True)
class ImageCodec:
    """How one file becomes a ``(channels, size, size)`` float tensor in ``[0, 1]`` (or what
    a timm transform returns): decode, resize, then the view's transform (picklable, so
    it travels to the workers)."""

    image_size: int
    channels: int
    decoder: str  # "torchvision" | "pil"
    train_transform: Any = None
    eval_transform: Any = None
    field: str = f"{ARGS}.root"
    normalize: tuple[float, float] | None = None  # (mean, std) applied after scaling

    def decode(self, path: str) -> Any:
        """The image at ``path``, uint8 ``(C, H, W)`` (torchvision) or a PIL image, by the
        one image policy (:mod:`mneme.datamodules.data.image_policy`: size checked before
        decoding, every mode to 8-bit gray or RGB); an unreadable file is refused in one
        line naming it."""
        from mneme.datamodules.data.image_policy import decode_pil, decode_uint8

        if self.decoder == "pil":
            return decode_pil(path, self.channels, self.field)
        return decode_uint8(path, self.channels, self.field)

    def load(self, path: str, train: bool, seed: tuple[int, ...] | None) -> Tensor:
        from torchvision.transforms.v2 import functional as F

        image = self.decode(path)
        transform = self.train_transform if train else self.eval_transform
        if transform is not None and seed is not None:
            image = seeded(transform, image, seed)
        elif transform is not None:
            image = transform(image)
        if not isinstance(image, Tensor):  # a PIL image left as is
            image = F.pil_to_tensor(image)
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = F.resize(image, [self.image_size, self.image_size], antialias=True)
        if image.dtype == torch.uint8:
            image = F.to_dtype(image, torch.float32, scale=True)
        if self.normalize is not None:
            image = (image - self.normalize[0]) / self.normalize[1]
        return image


def seeded(transform: Any, image: Any, key: tuple[int, ...]) -> Any:
    """``transform(image)`` with torch's and Python's RNGs (what torchvision and timm
    transforms draw from) seeded by ``key``, then restored: a sample's augmentation is the
    same in any worker, or in the main process, whose model RNG it must not disturb."""
    state = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    seed = int(state[0]) << 32 | int(state[1])
    # torch.manual_seed would also seed every accelerator (~1 ms a call): the CPU
    # generator alone is what CPU-side transforms draw from.
    generator = torch.default_generator
    states = generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(states[0])
        random.setstate(states[1])


class FileImages(Dataset):
    """The images of one experience, decoded on demand. A key is an index (the evaluation
    view, no augmentation) or ``(index, seed, epoch)`` from :class:`KeySampler` (training:
    the augmentation seeded by the key)."""

    def __init__(self, paths: Sequence[str], labels: Tensor, task: int, codec: ImageCodec):
        self.paths = list(paths)
        self.targets = labels
        self.task = task
        self.codec = codec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int, int]):
        if isinstance(key, tuple):
            index, seed, epoch = key
            image = self.codec.load(self.paths[index], True, (seed, epoch, index))
        else:
            index = int(key)
            image = self.codec.load(self.paths[index], False, None)
        return image, int(self.targets[index]), self.task


class KeySampler(EpochSampler):
    """The datamodule's epoch order as ``(index, seed, epoch)`` keys; the order can be
    replaced between epochs (the sampler runs in the main process, so a persistent worker
    pool serves the new order)."""

    def __init__(self, order: Tensor, seed: int, epoch: int) -> None:
        super().__init__(order)
        self.seed, self.epoch = seed, epoch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return ((i, self.seed, self.epoch) for i in self.order.tolist())


class FileLoader(DataLoader):
    """A DataLoader whose worker errors stay one line: torch re-raises a worker's exception
    with the worker's traceback in its message; a :class:`ConfigError` (an unreadable
    image) keeps only its own message, as every Mneme error does."""

    def __iter__(self):
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except ConfigError as err:
                raise ConfigError(dataloader_worker_message(err, "ConfigError")) from None
            yield batch


class FileExperience(ExperienceData):
    """One experience of a file stream: paths and labels in memory, images read on demand.

    Its training loader is kept through the experience's epochs (only the sampler's order
    changes), so its persistent workers live as long as the experience trains; asking for
    another experience's loader lets them go.
    """

    def __init__(self, dataset: FileImages, pool: dict) -> None:
        self.dataset = dataset
        self.collate = SampleCollate(FIELDS)
        self.num_workers = 0  # the datamodule's data.num_workers, set when it takes the stream
        self.classes = sorted(dataset.targets.unique().tolist())
        self.tasks = [dataset.task]
        self._pool = pool  # shared by the stream's experiences: at most one training loader

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self) -> Tensor:
        return self.dataset.targets

    def task_labels(self) -> Tensor:
        return torch.full_like(self.dataset.targets, self.dataset.task)

    def batches(self, batch_size: int, index: Tensor | None = None) -> Iterator[Batch]:
        keys = list(range(len(self))) if index is None else index.tolist()
        chunks = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        # One batch (Replay's read, a shape probe) decodes here; more use the workers.
        workers = self.num_workers if len(chunks) > 1 else 0
        yield from FileLoader(
            self.dataset, batch_sampler=chunks, num_workers=workers, collate_fn=self.collate
        )

    def loader(
        self,
        batch_size: int,
        order: dict[str, Any],
        *,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int,
    ) -> DataLoader:
        """The loader of this experience for one epoch (``order``: the datamodule's
        ``shuffle``, ``seed``, ``epoch``, ``rank``, ``world_size``, ``pad_shards``)."""
        from mneme.datamodules.data.tensor_batches import epoch_order

        train = bool(order["shuffle"])
        indices = epoch_order(len(self), **order)
        key = (id(self), batch_size, num_workers, pin_memory, prefetch_factor)
        for other in [k for k in self._pool if train and k != key]:
            del self._pool[other]  # one training loader at a time: the previous one's workers end
        if train and key in self._pool:  # the same workers, the new epoch's order
            loader = self._pool[key]
            loader.sampler.order, loader.sampler.epoch = indices, order["epoch"]
            return loader
        loader = FileLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=KeySampler(indices, order["seed"], order["epoch"])
            if train
            else EpochSampler(indices),
            num_workers=num_workers,
            collate_fn=self.collate,
            pin_memory=pin_memory,
            # Training: the loader (and its workers) serve every epoch of the experience.
            # Evaluation: one loader per test experience, run at experience ends; persistent,
            # they would keep num_workers idle processes per test experience all run long.
            persistent_workers=train and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            # the loader's own generator: workers' base seeds never draw from the global RNG
            generator=torch.Generator().manual_seed(order["seed"]),
        )
        if train:
            self._pool[key] = loader
        return loader


class FileScenario:
    """An Avalanche-like scenario whose streams are :class:`FileExperience` lists."""

    def __init__(self, train: list[FileExperience], test: list[FileExperience]) -> None:
        self.train_stream, self.test_stream = train, test


def check_transform_source(codec_decoder: str, spec: TransformSpec | None) -> str:
    """The decoder to use: timm's transforms take PIL images, so a timm spec decodes with PIL."""
    if codec_decoder not in ("torchvision", "pil"):
        raise ConfigError(f"{ARGS}.decoder: 'torchvision' or 'pil', got {codec_decoder!r}")
    return "pil" if spec is not None and spec.kind == "timm" else codec_decoder


def make_codec(
    image_size: int,
    channels: int,
    decoder: str,
    train_transform: Any,
    eval_transform: Any,
    field: str,
    normalize: Sequence[float] | None = None,
) -> ImageCodec:
    if channels not in (1, 3):
        raise ConfigError(f"{ARGS}.channels: 1 (gray) or 3 (RGB), got {channels}")
    if not 1 <= image_size <= 4096:
        raise ConfigError(f"{ARGS}.image_size: from 1 to 4096, got {image_size}")
    train = build_transform(train_transform, f"{ARGS}.train_transform", image_size, channels, True)
    evaluate = build_transform(eval_transform, f"{ARGS}.eval_transform", image_size, channels)
    kinds = {s.kind for s in (train, evaluate) if s is not None}
    if len(kinds) > 1:
        raise ConfigError(
            f"{ARGS}.eval_transform: a timm and a torchvision transform in one stream decode "
            "differently (PIL vs tensors); use the same kind for train_transform and eval_transform"
        )
    decoder = check_transform_source(decoder, train or evaluate)
    if normalize is not None and (len(normalize) != 2 or not float(normalize[1]) > 0):
        raise ConfigError(f"{ARGS}.normalize: [mean, std] with std > 0, got {normalize}")
    return ImageCodec(
        image_size,
        channels,
        decoder,
        None if train is None else train.transform,
        None if evaluate is None else evaluate.transform,
        field,
        None if normalize is None else (float(normalize[0]), float(normalize[1])),
    )
