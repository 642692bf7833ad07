"""One experience of a stream, as strategies read it: what it holds without reading it, and
its samples on demand.

A strategy (EWC's Fisher, Replay's buffer, LwF's class masks, the embedding projector) asks
an experience for what it needs and nothing more:

- ``len(experience)``, ``classes``, ``tasks``, ``labels()``, ``task_labels()``: known
  without reading a sample (from the tensors, or from Avalanche's ``targets`` and
  ``targets_task_labels`` attributes);
- ``read(index)``: the samples at ``index`` as one dict batch;
- ``batches(batch_size, index)``: those samples in batches.

:class:`TensorExperience` holds a materialized experience (contiguous tensors, sliced by
index); :class:`DatasetExperience` reads an Avalanche dataset sample by sample, through a
``DataLoader``, so a stream of files larger than memory never sits in memory. Both serve
the same values in the same order, so a run trains alike either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.tensor_batches import Batch
from torch import Tensor
from torch.utils.data import DataLoader, Subset


def fixed_generator() -> torch.Generator:
    """A loader's own generator: iterating a ``DataLoader`` without one draws its base seed
    from torch's global RNG, which would shift the model's initialisation by how the data
    was read."""
    return torch.Generator().manual_seed(0)


class ExperienceData:
    """What every experience offers; see the module docstring."""

    classes: list[int]
    tasks: list[int]

    def __len__(self) -> int:
        raise NotImplementedError

    def labels(self) -> Tensor:
        """Every sample's class label, in order (no sample is read)."""
        raise NotImplementedError

    def task_labels(self) -> Tensor:
        """Every sample's task label, in order (no sample is read)."""
        raise NotImplementedError

    def batches(self, batch_size: int, index: Tensor | None = None) -> Iterator[Batch]:
        """The samples at ``index`` (all, in order, by default) in batches of ``batch_size``."""
        raise NotImplementedError

    def read(self, index: Tensor) -> Batch:
        """The samples at ``index``, as one batch."""
        parts = list(self.batches(max(len(index), 1), index))
        return parts[0] if parts else {}

    def field_shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of one sample's field ``key``; ``None`` when samples lack it."""
        sample = self.first_sample()
        return tuple(sample[key].shape[1:]) if key in sample else None

    def fields(self) -> list[str]:
        """The names of a sample's fields."""
        return sorted(self.first_sample())

    def first_sample(self) -> Batch:
        """The first sample as a batch of one, read once and kept (layout probes)."""
        if getattr(self, "_first", None) is None:
            self._first = self.read(torch.arange(min(1, len(self))))
        return self._first


class TensorExperience(ExperienceData):
    """A materialized experience: ``{field: tensor}`` sharing their first dimension."""

    def __init__(self, tensors: Batch) -> None:
        self.tensors = tensors
        self.classes = sorted(self.labels().unique().tolist()) if "label" in tensors else []
        self.tasks = sorted(self.task_labels().unique().tolist()) if "label" in tensors else []

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def labels(self) -> Tensor:
        return self.tensors["label"]

    def task_labels(self) -> Tensor:
        task = self.tensors.get("task")
        return task if task is not None else torch.zeros_like(self.labels())

    def batches(self, batch_size: int, index: Tensor | None = None) -> Iterator[Batch]:
        index = torch.arange(len(self)) if index is None else index
        for chunk in index.split(batch_size):
            yield {k: v.index_select(0, chunk.to(v.device)) for k, v in self.tensors.items()}

    def field_shape(self, key: str) -> tuple[int, ...] | None:
        return tuple(self.tensors[key].shape[1:]) if key in self.tensors else None

    def fields(self) -> list[str]:
        return sorted(self.tensors)


def as_experience(data: ExperienceData | Batch) -> ExperienceData:
    """``data`` as an experience (a dict of tensors is wrapped, e.g. in tests)."""
    return data if isinstance(data, ExperienceData) else TensorExperience(dict(data))


class SampleCollate:
    """Collate samples (tuples ``[x, y, (extra...), t]``) into a dict batch named by
    ``sample_keys``; a sample without a task label gets task 0."""

    def __init__(self, sample_keys: Sequence[str]) -> None:
        self.sample_keys = list(sample_keys)

    def __call__(self, samples: list) -> Batch:
        width = len(samples[0])
        if width not in (len(self.sample_keys), len(self.sample_keys) - 1):
            raise ConfigError(
                f"data.sample_keys: the stream's samples have {width} fields, "
                f"but sample_keys names {len(self.sample_keys)}: {self.sample_keys}"
            )
        columns = zip(*samples, strict=True)
        batch = {
            key: torch.stack([torch.as_tensor(v) for v in column])
            for key, column in zip(self.sample_keys, columns, strict=False)
        }
        if not batch["label"].is_floating_point():  # a float "label" is refused, not cut
            batch["label"] = batch["label"].long()
        batch["task"] = batch.get("task", torch.zeros_like(batch["label"])).long()
        return batch


def check_class_indices(labels: Tensor) -> None:
    """Refuse negative labels: a label is a class index (heads have one output each)."""
    if len(labels) and labels.min() < 0:
        raise ConfigError(
            f"data.benchmark: labels must be class indices >= 0, found {labels.min()}"
        )


def check_label_field(batch: Batch, targets: Tensor | None, sample_keys: Sequence[str]) -> None:
    """Refuse ``sample_keys`` that name the wrong position ``label``: the field must hold one
    class index per sample and, where the stream knows its targets (Avalanche's datasets
    do), be them."""
    label = batch["label"]
    position = list(sample_keys).index("label")
    if label.ndim != 1 or label.is_floating_point() or label.is_complex():
        raise ConfigError(
            f"data.sample_keys: position {position} ('label') holds {tuple(label.shape[1:])} "
            f"{label.dtype} values per sample, not a class index; name the fields in the "
            f"stream's order (got {list(sample_keys)})"
        )
    if targets is not None and not torch.equal(label.cpu(), targets[: len(label)]):
        raise ConfigError(
            f"data.sample_keys: position {position} ('label') is not the stream's class label "
            f"(e.g. {label[:5].tolist()} where the stream says {targets[:5].tolist()}); "
            f"Avalanche's generators keep the class second: name the fields in the "
            f"stream's order (got {list(sample_keys)})"
        )
    check_class_indices(label)


def stream_targets(dataset: Any) -> Tensor | None:
    """The class labels an Avalanche dataset knows without reading a sample, or ``None``."""
    targets = getattr(dataset, "targets", None)
    return None if targets is None else torch.as_tensor(list(targets), dtype=torch.long)


class DatasetExperience(ExperienceData):
    """An experience read from its Avalanche dataset on demand (``materialize: false``).

    Strategies read through the dataset's evaluation view (``dataset.eval()``, Avalanche's
    transform group without train-time augmentation): what Replay keeps and what EWC's
    Fisher sees are the stored samples, the same on every run and after a resume.
    """

    def __init__(
        self,
        experience: Any,
        sample_keys: Sequence[str],
        num_workers: int = 0,
    ) -> None:
        self.dataset = experience.dataset
        self.collate = SampleCollate(sample_keys)
        self.num_workers = num_workers
        self.classes = sorted(int(c) for c in experience.classes_in_this_experience)
        self.tasks = sorted(int(t) for t in getattr(experience, "task_labels", [0]))
        check_class_indices(torch.tensor(self.classes))
        self._labels: Tensor | None = None
        self._task_labels: Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self) -> Tensor:
        if self._labels is None:
            self._labels, self._task_labels = self._metadata()
        return self._labels

    def task_labels(self) -> Tensor:
        if self._task_labels is None:
            self._labels, self._task_labels = self._metadata()
        return self._task_labels

    def first_sample(self) -> Batch:
        first = super().first_sample()
        if first:
            check_label_field(first, stream_targets(self.dataset), self.collate.sample_keys)
        return first

    def _metadata(self) -> tuple[Tensor, Tensor]:
        labels = stream_targets(self.dataset)
        if labels is None:  # not an Avalanche classification dataset: read the labels once
            labels, tasks = [], []
            for batch in self.batches(1024):
                labels.append(batch["label"])
                tasks.append(batch["task"])
            return torch.cat(labels), torch.cat(tasks)
        task_labels = getattr(self.dataset, "targets_task_labels", None)
        tasks = (
            torch.zeros_like(labels)
            if task_labels is None
            else torch.as_tensor(list(task_labels), dtype=torch.long)
        )
        return labels, tasks

    def batches(self, batch_size: int, index: Tensor | None = None) -> Iterator[Batch]:
        view = self.dataset.eval() if hasattr(self.dataset, "eval") else self.dataset
        if index is not None:
            view = Subset(view, index.tolist())
        yield from DataLoader(
            view,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            generator=fixed_generator(),
        )
