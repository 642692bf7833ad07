"""A LightningDataModule that serves any Avalanche benchmark stream, one experience at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Why import avalanche here: importing it for the first time inside a DDP worker, after the
# process group exists, raises in its default logger ("creating a logger in a non-main
# process"). Importing it with this module happens before Lightning starts the group.
import avalanche.benchmarks  # noqa: F401
import torch
from lightning.pytorch import LightningDataModule
from mneme.app.core import schedule
from mneme.app.core.errors import ConfigError
from mneme.app.core.seeding import preserved_rng, run_seed
from mneme.datamodules.data.device_transfer import FlatBatchTransfer
from mneme.datamodules.data.experiences import (
    DatasetExperience,
    ExperienceData,
    SampleCollate,
    TensorExperience,
    check_label_field,
    fixed_generator,
    stream_targets,
)
from mneme.datamodules.data.labels import class_limit
from mneme.datamodules.data.tensor_batches import EpochSampler, TensorBatches, epoch_order
from mneme.datamodules.streams.declared import AVALANCHE_FIELDS, DeclaredStream
from mneme.datamodules.streams.registry import resolve_benchmark
from torch.utils.data import DataLoader


def materialize(dataset, sample_keys: Sequence[str]) -> TensorExperience:
    """Read an Avalanche dataset once into contiguous tensors, one per named sample field.

    Avalanche yields tuples such as ``[x, y, t]``; ``sample_keys`` names their positions
    (``["image", "label", "task"]``, or ``["image", "label", "text", "task"]`` for a
    captioned stream: Avalanche's generators read and remap the class label at position 1,
    so ``label`` comes second). A sample without a task label gets task 0.
    """
    loader = DataLoader(
        dataset, batch_size=1024, collate_fn=SampleCollate(sample_keys), generator=fixed_generator()
    )
    parts = list(loader)
    if not parts:
        raise ConfigError("data.benchmark: an experience has no samples")
    tensors = {key: torch.cat([p[key] for p in parts]).contiguous() for key in parts[0]}
    check_label_field(tensors, stream_targets(dataset), sample_keys)
    return TensorExperience(tensors)


class ContinualDataModule(FlatBatchTransfer, LightningDataModule):
    """Serves an Avalanche benchmark: the current training experience, every test experience.

    One ``fit`` trains the whole stream: experience ``k`` covers epochs
    ``[k * epochs_per_experience, (k + 1) * epochs_per_experience)``; the trainer settings
    that make it hold come from :meth:`trainer_settings` (the ``mneme`` CLI applies them)
    and ``setup`` refuses a trainer that breaks them (see :mod:`mneme.app.core.schedule`).

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
        sample_keys: names of the fields of each sample, in order, for a stream that does
            not declare them (an Avalanche benchmark; default ``[image, label, task]``):
            ``label`` second for streams made by Avalanche's generators, ``task`` may be
            absent, then 0. Mneme's streams declare their fields: leave it unset.
        materialize: hold experiences in memory as tensors and slice batches (fast). Set to
            False to read samples on demand through a DataLoader (a stream larger than
            memory, or random augmentation): nothing is read up front, and strategies read
            only the samples they use (:mod:`mneme.datamodules.data.experiences`).
        data_on_device: with ``materialize``, keep the tensors on the training device.
        num_workers: DataLoader workers of a stream read on demand (``materialize: false``,
            file streams: decoding and augmentation run in them).
        prefetch_factor: batches each worker loads ahead, for a file stream
            (:mod:`mneme.datamodules.streams.files`; its workers persist through an
            experience, and memory is pinned when training on CUDA).
        validate_each_epoch: validate after every epoch, not only at experience ends.
        seed: seed of the per-epoch shuffling; default the run's (``seed_everything``).
        max_classes: the largest label a stream may have, plus one (heads have one output
            per class index: a stray label of 10**9 would ask for a 24 GB head).
        allow_resume_changes: what a resume may change from the checkpoint's run
            (``benchmark``, ``benchmark_args``, ``class_order``, ``epochs_per_experience``,
            ``sample_keys``, ``strategies``, ``optimizer``: its class and settings, applied
            to the restored optimizer); anything else that differs is refused.
        predict_inputs: what ``mneme predict`` predicts instead of the test stream: a folder
            of images or a CSV of their paths (``path[,label][,task]``), read as the stream
            reads its images (:mod:`mneme.datamodules.data.predict_inputs`).

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
        sample_keys: Sequence[str] | None = None,
        materialize: bool = True,
        data_on_device: bool = False,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        validate_each_epoch: bool = False,
        seed: int | None = None,
        max_classes: int = 100_000,
        allow_resume_changes: Sequence[str] = (),
        predict_inputs: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("epochs_per_experience", epochs_per_experience),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_classes", max_classes),
            ("prefetch_factor", prefetch_factor),
        ):
            if value < 1:
                raise ConfigError(f"data.{name}: must be at least 1, got {value}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers: must be at least 0, got {num_workers}")
        self.save_hyperparameters(logger=False)
        self.benchmark = benchmark
        self.benchmark_args = dict(benchmark_args or {})
        self.factory = resolve_benchmark(benchmark, self.benchmark_args)
        self.epochs_per_experience = epochs_per_experience
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        if sample_keys is not None and "label" not in sample_keys:
            raise ConfigError(f"data.sample_keys: must include 'label', got {list(sample_keys)}")
        self._sample_keys = None if sample_keys is None else list(sample_keys)
        self._declared: DeclaredStream | None = None
        self.materialize = materialize
        self.data_on_device = data_on_device
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.validate_each_epoch = validate_each_epoch
        self.seed = seed
        self.max_classes = max_classes
        self.allow_resume_changes = list(allow_resume_changes)
        if predict_inputs is not None:
            from mneme.datamodules.data.predict_inputs import check_inputs

            check_inputs(predict_inputs)
        self.predict_inputs = predict_inputs
        self._scenario = None
        self._train: list[ExperienceData] = []
        self._test: list[ExperienceData] = []

    # -- the stream (built on first use: classic benchmarks download here) ----------------
    @property
    def scenario(self):
        """The Avalanche scenario, with ``train_stream`` and ``test_stream``."""
        if self._scenario is None:
            try:
                # Avalanche's generators reseed torch's global RNG; the stream checks its
                # labels against max_classes before anything is sized by class
                with preserved_rng(), class_limit(self.max_classes):
                    built = self.factory(**self.benchmark_args)
            except ConfigError as err:  # Mneme's own checks of the stream
                raise ConfigError(f"{err} (for {self.benchmark})") from err
            except (ValueError, TypeError, AssertionError, IndexError, KeyError) as err:
                # Avalanche's own checks (e.g. classes not divisible into experiences)
                raise ConfigError(f"data.benchmark_args: {err} (for {self.benchmark})") from err
            self._declared = self._declaration(built)
            scenario = self._declared.scenario
            with preserved_rng():
                self._train = [self._experience(e) for e in scenario.train_stream]
                self._test = [self._experience(e) for e in scenario.test_stream]
            if not self._train or not self._test:
                raise ConfigError(
                    f"data.benchmark: {self.benchmark} has {len(self._train)} training and "
                    f"{len(self._test)} test experiences; a stream needs at least one of each"
                )
            self._scenario = scenario
        return self._scenario

    def _declaration(self, built: Any) -> DeclaredStream:
        """What the stream says of its samples; ``data.sample_keys`` names the fields of a
        stream that does not declare them (Avalanche's), and must agree with one that does."""
        if not isinstance(built, DeclaredStream):
            return DeclaredStream(built, fields=self._sample_keys or AVALANCHE_FIELDS)
        if self._sample_keys is not None and self._sample_keys != list(built.fields):
            raise ConfigError(
                f"data.sample_keys: {self._sample_keys} contradicts the fields "
                f"{self.benchmark} declares, {list(built.fields)}; leave sample_keys unset"
            )
        return built

    @property
    def declaration(self) -> DeclaredStream:
        """What the stream declares of itself (a text stream: its tokenizer, block size, ...;
        see :mod:`mneme.datamodules.text.stream`)."""
        self.scenario  # noqa: B018
        return self._declared

    @property
    def sample_keys(self) -> list[str]:
        """The names of a sample's fields, in order (declared by the stream, or given)."""
        self.scenario  # noqa: B018
        return list(self._declared.fields)

    @property
    def class_names(self) -> list[str] | None:
        """The stream's class names (zero-shot prompts), or ``None`` if it declares none."""
        self.scenario  # noqa: B018
        names = self._declared.class_names
        return None if names is None else list(names)

    @property
    def input_normalization(self) -> tuple[float, float] | None:
        """The ``(mean, std)`` the stream standardized its images with, if it declares one."""
        self.scenario  # noqa: B018
        return self._declared.input_normalization

    @property
    def prompt_templates(self) -> list[str]:
        """The stream's prompt templates (``["{}"]`` unless it declares some)."""
        self.scenario  # noqa: B018
        return list(self._declared.prompt_templates)

    def _experience(self, experience) -> ExperienceData:
        if isinstance(experience, ExperienceData):  # a stream that serves its own (files):
            if self.data_on_device:  # never materialized
                raise ConfigError(
                    f"data.data_on_device: {self.benchmark} is read from files on demand, "
                    "not held as tensors; set data_on_device: false"
                )
            experience.num_workers = self.num_workers
            return experience
        if self.materialize:
            return materialize(experience.dataset, self._declared.fields)
        return DatasetExperience(experience, self._declared.fields, self.num_workers)

    @property
    def train_experiences(self) -> list[ExperienceData]:
        """The training experiences, in stream order: tensors when materialized, else read
        on demand (see :mod:`mneme.datamodules.data.experiences`)."""
        self.scenario  # noqa: B018 - builds the stream on first use
        return self._train

    @property
    def test_experiences(self) -> list[ExperienceData]:
        self.scenario  # noqa: B018
        return self._test

    @property
    def num_experiences(self) -> int:
        return len(self.train_experiences)

    @property
    def num_classes(self) -> int:
        """One more than the largest class label (a head has one output per index)."""
        largest = max(
            max(e.classes, default=0) for e in self.train_experiences + self.test_experiences
        )
        if largest >= self.max_classes:
            raise ConfigError(
                f"data.max_classes: the stream's largest label is {largest}, so a head would "
                f"have {largest + 1} outputs (limit {self.max_classes}); labels are class "
                "indices 0..C-1: relabel them, or raise data.max_classes"
            )
        return largest + 1

    @property
    def num_tasks(self) -> int:
        return 1 + max(
            max(e.tasks, default=0) for e in self.train_experiences + self.test_experiences
        )

    def field_shape(self, key: str, field: str = "model.input_key") -> tuple[int, ...]:
        """Shape of one sample of field ``key`` (a model takes its input shape from the field
        it reads); a field the stream lacks is refused naming ``field``."""
        experience = self.train_experiences[0]
        shape = experience.field_shape(key)
        if shape is None:
            raise ConfigError(
                f"{field}: the stream has no field '{key}' (its fields: "
                f"{experience.fields()}); name the fields with data.sample_keys"
            )
        return shape

    def run_definition(self) -> dict[str, Any]:
        """What of the stream defines a run (stored in checkpoints; a resume that changes
        it is refused unless ``allow_resume_changes`` names the field)."""
        return {
            "benchmark": self.benchmark,
            "benchmark_args": dict(self.benchmark_args),
            "class_order": [e.classes for e in self.train_experiences],
            "epochs_per_experience": self.epochs_per_experience,
            "sample_keys": list(self.sample_keys),
        }

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
                exp.tensors = {k: v.to(device) for k, v in exp.tensors.items()}  # type: ignore[attr-defined]
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
        return self._loader(
            self.train_experiences[experience], self.batch_size, shuffle=True, epoch=epoch
        )

    def _eval_dataloaders(self) -> list:
        return [
            self._loader(e, self.eval_batch_size, shuffle=False, epoch=0)
            for e in self.test_experiences
        ]

    def val_dataloader(self) -> list:
        return self._eval_dataloaders()

    def test_dataloader(self) -> list:
        return self._eval_dataloaders()

    def predict_dataloader(self) -> list:
        if self.predict_inputs is None:
            return self._eval_dataloaders()
        from mneme.datamodules.data.predict_inputs import predict_input_loader

        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return [predict_input_loader(self, self.predict_inputs, rank, world_size)]

    def _loader(self, experience: ExperienceData, batch_size: int, shuffle: bool, epoch: int):
        """Batches of one experience for this rank: training shards are padded to equal
        length (as DDP needs), evaluation shards are disjoint (metrics sum across ranks)."""
        trainer = self.trainer
        order = {
            "shuffle": shuffle,
            "seed": run_seed(self.seed),
            "epoch": epoch,
            "rank": trainer.global_rank if trainer else 0,
            "world_size": trainer.world_size if trainer else 1,
            "pad_shards": shuffle,
        }
        if isinstance(experience, TensorExperience):
            return TensorBatches(experience.tensors, batch_size, **order)
        if hasattr(experience, "loader"):  # a file stream's experience builds its own
            accelerator = trainer.strategy.root_device.type if trainer else "cpu"
            return experience.loader(
                batch_size,
                order,
                num_workers=self.num_workers,
                pin_memory=accelerator == "cuda",
                prefetch_factor=self.prefetch_factor,
            )
        return DataLoader(
            experience.dataset,
            batch_size=batch_size,
            sampler=EpochSampler(epoch_order(len(experience), **order)),
            num_workers=self.num_workers,
            collate_fn=experience.collate,
            # workers seed their transforms from the loader's generator: per epoch, so a
            # resumed run draws what an uninterrupted one drew
            generator=torch.Generator().manual_seed(run_seed(self.seed) * 100_003 + epoch),
            persistent_workers=False,
        )
