"""A LightningDataModule that serves any Avalanche benchmark stream, one experience at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Why import avalanche here: importing it for the first time inside a DDP worker, after the
# process group exists, raises in its default logger ("creating a logger in a non-main
# process"). Importing it with this module happens before Lightning starts the group.
import avalanche.benchmarks  # noqa: F401
import torch
from lightning.pytorch import LightningDataModule
from mneme.datamodules import schedule
from mneme.datamodules.benchmarks import resolve_benchmark
from mneme.datamodules.errors import ConfigError
from mneme.datamodules.tensor_batches import Batch, TensorBatches
from torch import Tensor
from torch.utils.data import DataLoader


@dataclass
class Experience:
    """One experience held as tensors, with what a model needs to know about it."""

    tensors: Batch
    classes: list[int]
    tasks: list[int]


def materialize(dataset, sample_keys: Sequence[str]) -> Experience:
    """Read an Avalanche dataset once into contiguous tensors, one per named sample field.

    Avalanche yields tuples such as ``[x, y, t]``; ``sample_keys`` names their positions
    (``["image", "label", "task"]``, or ``["image", "label", "text", "task"]`` for a
    captioned stream: Avalanche's generators read and remap the class label at position 1,
    so ``label`` comes second). A sample without a task label gets task 0.
    """
    columns: dict[str, list[Tensor]] = {key: [] for key in sample_keys}
    for sample in DataLoader(dataset, batch_size=1024, num_workers=0):
        if len(sample) not in (len(sample_keys), len(sample_keys) - 1):
            raise ConfigError(
                f"data.sample_keys: the stream's samples have {len(sample)} fields, "
                f"but sample_keys names {len(sample_keys)}: {list(sample_keys)}"
            )
        for key, value in zip(sample_keys, sample, strict=False):
            columns[key].append(torch.as_tensor(value))
    tensors = {key: torch.cat(parts).contiguous() for key, parts in columns.items() if parts}
    if "label" not in tensors:
        raise ConfigError("data.benchmark: an experience has no samples")
    tensors["label"] = tensors["label"].long()
    if tensors["label"].min() < 0:
        raise ConfigError(
            f"data.benchmark: labels must be class indices >= 0, found {tensors['label'].min()}"
        )
    tensors["task"] = tensors.get("task", torch.zeros_like(tensors["label"])).long()
    return Experience(
        tensors=tensors,
        classes=sorted(tensors["label"].unique().tolist()),
        tasks=sorted(tensors["task"].unique().tolist()),
    )


class ContinualDataModule(LightningDataModule):
    """Serves an Avalanche benchmark: the current training experience, every test experience.

    One ``fit`` trains the whole stream: experience ``k`` covers epochs
    ``[k * epochs_per_experience, (k + 1) * epochs_per_experience)``; the trainer settings
    that make it hold come from :meth:`trainer_settings` (the ``mneme`` CLI applies them)
    and ``setup`` refuses a trainer that breaks them (see :mod:`mneme.datamodules.schedule`).

    Args:
        benchmark: import path of any Avalanche benchmark factory or class, classic
            (``avalanche.benchmarks.classic.SplitMNIST``) or built-in
            (``mneme.datamodules.SplitDigits``, ``SplitMNISTFile``, ``PermutedMNISTFile``, ...).
            A path, not a ``class_path``/``init_args`` pair: Avalanche's classic benchmarks
            are factory functions, which jsonargparse cannot type as a subclass.
        benchmark_args: its keyword arguments; one can be overridden from the command line
            with ``--data.benchmark_args.NAME VALUE``.
        epochs_per_experience: training epochs on each experience.
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size per process.
        sample_keys: names of the fields of each sample, in order (must include ``label``,
            second for streams made by Avalanche's generators; ``task`` may be absent, then 0).
        materialize: hold experiences in memory as tensors and slice batches (fast). Set to
            False to go through a DataLoader per sample, e.g. for random augmentation.
        data_on_device: with ``materialize``, keep the tensors on the training device.
        validate_each_epoch: validate after every epoch, not only at experience ends.
        seed: seed of the per-epoch shuffling.
        trusted_benchmarks: import paths of your own benchmark factories that ``benchmark``
            may name besides Avalanche's and Mneme's (a config runs nothing else).

    Example (YAML)::

        data:
          benchmark: avalanche.benchmarks.classic.SplitMNIST
          benchmark_args: {n_experiences: 5, dataset_root: data/mnist}
          epochs_per_experience: 2
    """

    def __init__(
        self,
        benchmark: str = "mneme.datamodules.SplitDigits",
        benchmark_args: dict[str, Any] | None = None,
        epochs_per_experience: int = 1,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        sample_keys: Sequence[str] = ("image", "label", "task"),
        materialize: bool = True,
        data_on_device: bool = False,
        num_workers: int = 0,
        validate_each_epoch: bool = False,
        seed: int = 0,
        trusted_benchmarks: Sequence[str] = (),
    ) -> None:
        super().__init__()
        for name, value in (
            ("epochs_per_experience", epochs_per_experience),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise ConfigError(f"data.{name}: must be at least 1, got {value}")
        self.save_hyperparameters(logger=False)
        self.benchmark = benchmark
        self.benchmark_args = dict(benchmark_args or {})
        self.factory = resolve_benchmark(benchmark, self.benchmark_args, trusted_benchmarks)
        self.epochs_per_experience = epochs_per_experience
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        if "label" not in sample_keys:
            raise ConfigError(f"data.sample_keys: must include 'label', got {list(sample_keys)}")
        self.sample_keys = list(sample_keys)
        self.materialize = materialize
        self.data_on_device = data_on_device
        self.num_workers = num_workers
        self.validate_each_epoch = validate_each_epoch
        self.seed = seed
        self._scenario = None
        self._train: list[Experience] = []
        self._test: list[Experience] = []

    # -- the stream (built on first use: classic benchmarks download here) ----------------
    @property
    def scenario(self):
        """The Avalanche scenario, with ``train_stream`` and ``test_stream``."""
        if self._scenario is None:
            try:
                scenario = self.factory(**self.benchmark_args)
            except (ValueError, TypeError, AssertionError, IndexError, KeyError) as err:
                # Avalanche's own checks (e.g. classes not divisible into experiences)
                message = (
                    str(err) if str(err).startswith("data.") else f"data.benchmark_args: {err!s}"
                )
                raise ConfigError(f"{message} (for {self.benchmark})") from err
            self._train = [materialize(e.dataset, self.sample_keys) for e in scenario.train_stream]
            self._test = [materialize(e.dataset, self.sample_keys) for e in scenario.test_stream]
            self._scenario = scenario
        return self._scenario

    @property
    def train_experiences(self) -> list[Experience]:
        self.scenario  # noqa: B018 - builds the stream on first use
        return self._train

    @property
    def test_experiences(self) -> list[Experience]:
        self.scenario  # noqa: B018
        return self._test

    @property
    def num_experiences(self) -> int:
        return len(self.train_experiences)

    @property
    def num_classes(self) -> int:
        return 1 + max(max(e.classes) for e in self.train_experiences + self.test_experiences)

    @property
    def num_tasks(self) -> int:
        return 1 + max(max(e.tasks) for e in self.train_experiences + self.test_experiences)

    def field_shape(self, key: str, field: str = "model.input_key") -> tuple[int, ...]:
        """Shape of one sample of field ``key`` (a model takes its input shape from the field
        it reads); a field the stream lacks is refused naming ``field``."""
        tensors = self.train_experiences[0].tensors
        if key not in tensors:
            raise ConfigError(
                f"{field}: the stream has no field '{key}' (its fields: {sorted(tensors)}); "
                "name the fields with data.sample_keys"
            )
        return tuple(tensors[key].shape[1:])

    # -- Lightning hooks ----------------------------------------------------------------
    def prepare_data(self) -> None:
        self.scenario  # noqa: B018 - classic benchmarks download on one process first

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        if self.data_on_device and self.materialize:
            device = trainer.strategy.root_device
            for exp in self.train_experiences + self.test_experiences:
                exp.tensors = {k: v.to(device) for k, v in exp.tensors.items()}
        if stage == "fit":
            schedule.check_trainer(trainer, self, self.validate_each_epoch)

    def trainer_settings(self, **user: Any) -> dict[str, Any]:
        """The trainer arguments this stream's schedule needs (``max_epochs``, reloading
        the train data each epoch, validation at experience ends); ``user`` settings that
        conflict are refused. ``Trainer(**datamodule.trainer_settings(), ...)``."""
        return schedule.trainer_settings(self, self.validate_each_epoch, user)

    def train_dataloader(self):
        # With the loader rebuilt every epoch, Lightning builds it again at the start of
        # each epoch, when ``current_epoch`` is the running one; the extra build during a
        # restore (where it still shows the finished epoch) is replaced before any batch.
        epoch = self.trainer.current_epoch
        experience = min(epoch // self.epochs_per_experience, self.num_experiences - 1)
        if self.materialize:
            return TensorBatches(
                self.train_experiences[experience].tensors,
                self.batch_size,
                shuffle=True,
                seed=self.seed,
                epoch=epoch,
                rank=self.trainer.global_rank,
                world_size=self.trainer.world_size,
                pad_shards=True,
            )
        dataset = self.scenario.train_stream[experience].dataset
        return self._dataloader(dataset, self.batch_size, shuffle=True)

    def _eval_dataloaders(self) -> list:
        if self.materialize:
            return [
                TensorBatches(
                    exp.tensors,
                    self.eval_batch_size,
                    rank=self.trainer.global_rank if self.trainer else 0,
                    world_size=self.trainer.world_size if self.trainer else 1,
                    pad_shards=False,
                )
                for exp in self.test_experiences
            ]
        return [
            self._dataloader(e.dataset, self.eval_batch_size, shuffle=False)
            for e in self.scenario.test_stream
        ]

    def val_dataloader(self) -> list:
        return self._eval_dataloaders()

    def test_dataloader(self) -> list:
        return self._eval_dataloaders()

    def predict_dataloader(self) -> list:
        return self._eval_dataloaders()

    def _dataloader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        keys = self.sample_keys

        def to_dict(samples: list) -> Batch:
            fields = [
                torch.stack([torch.as_tensor(v) for v in f]) for f in zip(*samples, strict=True)
            ]
            batch = dict(zip(keys, fields, strict=False))
            batch.setdefault("task", torch.zeros_like(batch["label"]))
            return batch

        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=to_dict,
            generator=torch.Generator().manual_seed(self.seed),
        )
