"""Inputs of ``mneme predict`` other than the stream's: ``data.predict_inputs``, a folder of
images or a CSV of their paths, read as the stream reads its images.

- a folder: every image below it (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``), in sorted path
  order; when every image sits in a sub-folder named after a class (its index, or a class
  name the stream declares), that is its true ``label``;
- a CSV (``.csv``, or ``.tsv`` tab-separated) with a header: ``path`` (relative to the CSV's
  folder, or absolute), optionally ``label`` (class index or name) and ``task`` (the head of
  a task-incremental model, which needs it).

Each image becomes what the model was trained on: a file stream's own evaluation view (its
decoding, resizing, transform and normalization), else decoded to the stream's channels,
resized to its ``(H, W)``, scaled to ``[0, 1]`` and standardized with the ``(mean, std)`` the
stream declares (:attr:`ContinualDataModule.input_normalization`). A stream whose samples are
not plain images (pixel permutations per experience, rotations) has no such view, and is
refused rather than predicted wrongly.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.tensor_batches import EpochSampler, epoch_order
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

FIELD = "data.predict_inputs"
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Streams whose samples are images transformed per experience: a raw image is none of them.
TRANSFORMED_STREAMS = ("PermutedMNIST", "PermutedMNISTFile", "RotatedMNIST")


@dataclass(frozen=True)
class InputImage:
    path: str
    label: int | None = None
    task: int = 0


def class_index(name: str, class_names: Sequence[str] | None, num_classes: int) -> int | None:
    """A label written as a class index or as one of the stream's class names."""
    if name.isdigit() and int(name) < num_classes:
        return int(name)
    if class_names and name in class_names:
        return list(class_names).index(name)
    return None


def check_inputs(spec: str) -> None:
    """Refuse, before anything runs, a ``spec`` that is no CSV nor a folder with an image."""
    root = Path(spec)
    if root.is_file() and root.suffix.lower() in (".csv", ".tsv"):
        return
    if not root.is_dir():
        raise ConfigError(
            f"{FIELD}: '{spec}' is neither a folder of images nor a CSV file "
            "(columns path[,label][,task]); pass one of them"
        )
    if not any(p.suffix.lower() in SUFFIXES for p in root.rglob("*")):
        raise ConfigError(f"{FIELD}: '{spec}' holds no image ({', '.join(SUFFIXES)})")


def read_inputs(spec: str, class_names: Sequence[str] | None, num_classes: int) -> list[InputImage]:
    """The images ``spec`` names (see the module docstring), refused in one line if none."""
    check_inputs(spec)
    root = Path(spec)
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
        labels = [
            class_index(p.parent.name, class_names, num_classes) if p.parent != root else None
            for p in paths
        ]
        if any(label is None for label in labels):  # labelled only if every one is
            labels = [None] * len(paths)
        images = [InputImage(str(p), label) for p, label in zip(paths, labels, strict=True)]
    else:
        images = read_csv(root, class_names, num_classes)
    if not images:
        raise ConfigError(f"{FIELD}: '{spec}' holds no image ({', '.join(SUFFIXES)})")
    return images


def read_csv(path: Path, class_names: Sequence[str] | None, num_classes: int) -> list[InputImage]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter=delimiter))
    if rows and "path" not in rows[0]:
        raise ConfigError(
            f"{FIELD}: '{path}' has no `path` column (its header: {list(rows[0])}); "
            "write a header path[,label][,task]"
        )
    images = []
    for line, row in enumerate(rows, start=2):
        label = (row.get("label") or "").strip()
        index = class_index(label, class_names, num_classes) if label else None
        if label and index is None:
            raise ConfigError(
                f"{FIELD}: '{path}' line {line}: label '{label}' is neither a class index "
                f"below {num_classes} nor a class name of the stream"
            )
        task = (row.get("task") or "0").strip()
        if not task.isdigit():
            raise ConfigError(f"{FIELD}: '{path}' line {line}: task '{task}' is not an integer")
        image = Path(row["path"])
        image = image if image.is_absolute() else path.parent / image
        images.append(InputImage(str(image), index, int(task)))
    if len({image.label is None for image in images}) > 1:
        raise ConfigError(f"{FIELD}: '{path}' gives a label for some rows only; all or none")
    return images


class PlainImageLoader:
    """Decode to ``channels``, resize to ``size``, scale to ``[0, 1]``, standardize with
    ``normalization`` (``(mean, std)``, floats or one per channel). Picklable, for workers."""

    def __init__(self, channels: int, size: tuple[int, int], normalization: Any) -> None:
        self.channels, self.size = channels, list(size)
        self.mean = self.std = None
        if normalization is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in normalization)
            self.mean, self.std = mean, std

    def __call__(self, path: str) -> Tensor:
        from mneme.datamodules.data.image_policy import decode_pil
        from torchvision.transforms.v2 import functional as F

        # the streams' one image policy: size checked before decoding, modes to 8 bits
        image = F.pil_to_tensor(decode_pil(path, self.channels, FIELD))
        image = F.resize(image, self.size, antialias=True)
        image = F.to_dtype(image, torch.float32, scale=True)
        return image if self.mean is None else (image - self.mean) / self.std


class InputImages(Dataset):
    def __init__(self, images: list[InputImage], load: Callable[[str], Tensor]) -> None:
        self.images, self.load = images, load

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        sample = {"image": self.load(image.path), "task": image.task, "path": image.path}
        if image.label is not None:
            sample["label"] = image.label
        return sample


def predict_input_loader(datamodule, spec: str, rank: int, world_size: int) -> DataLoader:
    """Batches of ``{image, task, path[, label]}`` for ``spec``, this process's strided
    shard (as the stream's evaluation loaders: process ``r`` of ``W`` reads ``r, r + W, ...``)."""
    name = datamodule.benchmark.rsplit(".", 1)[-1]
    if name in TRANSFORMED_STREAMS:
        raise ConfigError(
            f"{FIELD}: {name} transforms its images per experience; a plain image has no "
            "such view: predict on the stream (leave data.predict_inputs unset)"
        )
    images = read_inputs(spec, datamodule.class_names, datamodule.num_classes)
    if datamodule.num_tasks > 1 and all(image.task == 0 for image in images):
        raise ConfigError(
            f"{FIELD}: the stream has {datamodule.num_tasks} tasks, and the model a head per "
            "task: give each image's task in a CSV column `task`"
        )
    shape = datamodule.field_shape("image", FIELD)
    codec = getattr(getattr(datamodule.test_experiences[0], "dataset", None), "codec", None)
    if codec is not None:  # a file stream: its own evaluation view
        load = functools.partial(codec.load, train=False, seed=None)
    elif len(shape) == 3:
        load = PlainImageLoader(shape[0], tuple(shape[1:]), datamodule.input_normalization)
    else:
        raise ConfigError(
            f"{FIELD}: the stream's images have shape {tuple(shape)}, not (channels, height, "
            "width); predict on the stream"
        )
    order = epoch_order(len(images), shuffle=False, seed=0, epoch=0, rank=rank,
                        world_size=world_size, pad_shards=False)  # fmt: skip
    return DataLoader(
        InputImages(images, load),
        batch_size=datamodule.eval_batch_size,
        sampler=EpochSampler(order),
        num_workers=datamodule.num_workers,
        collate_fn=default_collate,
    )
