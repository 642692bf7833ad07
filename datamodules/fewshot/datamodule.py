"""A LightningDataModule that serves few-shot episodes (N-way K-shot, Q queries per class) as
meta-batches, from any stream :class:`~mneme.datamodules.ContinualDataModule` serves.

The stream is named and built exactly as there (``benchmark``, ``benchmark_args``,
``sample_keys``; an inner ``ContinualDataModule`` does it). Classes, not the stream's
train/test rows, separate meta-train, meta-validation and meta-test: the pool of a split is
every sample of its classes, in the train and the test stream alike (the usual few-shot
protocol: a class is meta-train or meta-test as a whole). The episode machinery is in
:mod:`mneme.datamodules.fewshot.episodes`, the loaders' dataset and sampler in
:mod:`mneme.datamodules.fewshot.meta_batch_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningDataModule
from mneme.app.core.errors import ConfigError
from mneme.app.core.seeding import run_seed
from mneme.datamodules.continual import ContinualDataModule
from mneme.datamodules.data.device_transfer import FlatBatchTransfer
from mneme.datamodules.data.experiences import fixed_generator
from mneme.datamodules.fewshot.episodes import (
    NOT_SERVED,
    EpisodeSampler,
    SamplePool,
    check_class_splits,
    check_episode_counts,
)
from mneme.datamodules.fewshot.meta_batch_dataset import EpochKeys, MetaBatches
from torch.utils.data import DataLoader

SPLIT_FIELDS = {
    "train": "data.meta_train_classes",
    "val": "data.meta_val_classes",
    "test": "data.meta_test_classes",
}


class EpisodicDataModule(FlatBatchTransfer, LightningDataModule):
    """Few-shot episodes from any Avalanche benchmark or Mneme stream, as meta-batches.

    Every loader yields dicts: ``support`` ``{field: (T, N*K, *shape)}`` and ``query``
    ``{field: (T, N*Q, *shape)}`` for each sample field except ``label``/``task``,
    ``support_label`` ``(T, N*K)`` and ``query_label`` ``(T, N*Q)`` episode-local labels
    (class-major: N blocks of K, resp. Q), ``classes`` ``(T, N)`` the global class of each
    local label, ``episode`` ``(T,)`` the episodes' indices and ``padded`` ``(T,)`` True for an
    evaluation episode repeated only to even out DDP ranks (leave it out of metrics).

    - ``train_dataloader``: meta-train classes, ``(n_way, k_shot, q_queries)``,
      ``train_episodes`` fresh episodes per epoch, decided by ``(seed, epoch, index)``.
    - ``val_dataloader``: meta-val classes (none without them), the first eval setting.
    - ``test_dataloader``: one loader per eval setting on meta-test classes, episodes fixed
      by ``(eval_seed, setting, index)``: two models meet the same episodes.

    Under DDP, episode ``i`` goes to rank ``i % world_size``, drawn the same whatever the
    world size. Every rank serves ``ceil(episodes / world_size)`` episodes: training pads
    with fresh episodes, evaluation with repeats flagged ``padded``.

    Args:
        benchmark, benchmark_args, sample_keys, max_classes: the stream,
            as :class:`~mneme.datamodules.ContinualDataModule` takes them.
        meta_train_classes, meta_val_classes, meta_test_classes: class ids of each split;
            no class in two. Ten-class streams (digits, MNIST, spoken digits): meta-train
            ``[0, 1, 2, 3, 4]``, meta-test ``[5, 6, 7, 8, 9]``
            (:data:`~mneme.datamodules.fewshot.episodes.DIGITS_META_TRAIN`).
        n_way, k_shot, q_queries: the training setting; ``q_queries`` holds for all.
        eval_settings: ``[[n_way, k_shot], ...]`` of evaluation; default the training's.
        train_episodes: episodes per training epoch. eval_episodes: per eval setting.
        tasks_per_batch: episodes per meta-batch (T), training and evaluation.
        eval_seed: seed of the evaluation episodes.
        seed: seed of the training episodes; default the run's (``seed_everything``).
        num_workers: loader worker processes (meta-batches are drawn in them).
        materialize: hold the stream as tensors (default); ``False`` reads only the samples
            episodes use, from the stream's datasets.

    Example (YAML)::

        data:
          class_path: mneme.datamodules.EpisodicDataModule
          init_args:
            benchmark: mneme.datamodules.SplitDigits
            meta_train_classes: [0, 1, 2, 3, 4]
            meta_test_classes: [5, 6, 7, 8, 9]
            n_way: 5
            k_shot: 1
            eval_settings: [[5, 1], [5, 5]]
    """

    def __init__(
        self,
        benchmark: str,
        benchmark_args: dict[str, Any] | None = None,
        sample_keys: list[str] | None = None,
        meta_train_classes: list[int] | None = None,
        meta_val_classes: list[int] | None = None,
        meta_test_classes: list[int] | None = None,
        n_way: int = 5,
        k_shot: int = 1,
        q_queries: int = 15,
        eval_settings: list[list[int]] | None = None,
        train_episodes: int = 100,
        eval_episodes: int = 600,
        tasks_per_batch: int = 4,
        eval_seed: int = 0,
        seed: int | None = None,
        num_workers: int = 0,
        materialize: bool = True,
        max_classes: int = 100_000,
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_way", n_way),
            ("k_shot", k_shot),
            ("q_queries", q_queries),
            ("train_episodes", train_episodes),
            ("eval_episodes", eval_episodes),
            ("tasks_per_batch", tasks_per_batch),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name}: must be an integer of at least 1, got {value!r}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers: must be at least 0, got {num_workers}")
        self._eval_settings = self._settings(eval_settings, n_way, k_shot)
        self._settings_given = eval_settings is not None
        for name, classes in (("train", meta_train_classes), ("test", meta_test_classes)):
            if not classes:
                raise ConfigError(
                    f"{SPLIT_FIELDS[name]}: required, the classes of meta-{name} episodes "
                    "(ten-class streams: meta_train_classes [0, 1, 2, 3, 4], "
                    "meta_test_classes [5, 6, 7, 8, 9])"
                )
        if meta_val_classes is not None and not meta_val_classes:
            raise ConfigError(
                "data.meta_val_classes: empty; list the classes of validation episodes, or "
                "leave it unset (no validation)"
            )
        self.splits = {
            "train": list(meta_train_classes),
            "val": None if meta_val_classes is None else list(meta_val_classes),
            "test": list(meta_test_classes),
        }
        check_class_splits({SPLIT_FIELDS[k]: v for k, v in self.splits.items()})
        self.save_hyperparameters(logger=False)
        self.stream = ContinualDataModule(
            benchmark,
            benchmark_args,
            sample_keys=sample_keys,
            materialize=materialize,
            num_workers=0,  # episodes are drawn in this module's workers, not in nested ones
            max_classes=max_classes,
        )
        self.benchmark = benchmark
        self.benchmark_args = self.stream.benchmark_args
        self.n_way, self.k_shot, self.q_queries = n_way, k_shot, q_queries
        self.train_episodes, self.eval_episodes = train_episodes, eval_episodes
        self.tasks_per_batch = tasks_per_batch
        self.eval_seed, self.seed = eval_seed, seed
        self.num_workers = num_workers
        self._pool: SamplePool | None = None
        self._samplers: dict[str, EpisodeSampler] = {}

    @staticmethod
    def _settings(settings, n_way: int, k_shot: int) -> list[tuple[int, int]]:
        if settings is None:
            return [(n_way, k_shot)]
        if not settings:
            raise ConfigError(
                "data.eval_settings: empty; list [n_way, k_shot] pairs, or leave it unset"
            )
        out = []
        for i, setting in enumerate(settings):
            ok = isinstance(setting, list | tuple) and len(setting) == 2
            if not ok or any(isinstance(v, bool) or not isinstance(v, int) for v in setting):
                raise ConfigError(
                    f"data.eval_settings[{i}]: {setting!r} is not an [n_way, k_shot] pair of "
                    "integers; write e.g. [[5, 1], [5, 5]]"
                )
            if min(setting) < 1:
                raise ConfigError(
                    f"data.eval_settings[{i}]: n_way and k_shot must be at least 1, got "
                    f"{list(setting)}"
                )
            out.append((int(setting[0]), int(setting[1])))
        return out

    # -- the pool (built on first use, checked against the splits) -----------------------
    @property
    def pool(self) -> SamplePool:
        """Every sample of the stream (train experiences, then test experiences)."""
        if self._pool is None:
            pool = SamplePool(self.stream.train_experiences + self.stream.test_experiences)
            self._check(pool)
            self._pool = pool
        return self._pool

    def _check(self, pool: SamplePool) -> None:
        names = self.class_names
        splits = {SPLIT_FIELDS[k]: v for k, v in self.splits.items()}
        check_class_splits(splits, pool.labels.unique().tolist(), names)
        samplers = {k: EpisodeSampler(pool.labels, v) for k, v in self.splits.items() if v}
        q = self.q_queries
        check_episode_counts(
            SPLIT_FIELDS["train"], self.splits["train"], samplers["train"].counts(),
            self.n_way, self.k_shot, q, class_names=names,
        )  # fmt: skip
        eval_splits = [("val", self._eval_settings[:1]), ("test", self._eval_settings)]
        for split, settings in eval_splits:
            if split not in samplers:
                continue
            for i, (n, k) in enumerate(settings):
                where = f"data.eval_settings[{i}]"
                ways, shots = (
                    (where, where) if self._settings_given else ("data.n_way", "data.k_shot")
                )
                check_episode_counts(
                    SPLIT_FIELDS[split], self.splits[split], samplers[split].counts(),
                    n, k, q, way_field=ways, shot_field=shots, class_names=names,
                )  # fmt: skip
        self._samplers = samplers

    # -- what models read ------------------------------------------------------------------
    @property
    def sample_keys(self) -> list[str]:
        return self.stream.sample_keys

    @property
    def fields(self) -> list[str]:
        """The fields served in ``support``/``query`` (a sample's, without label/task)."""
        return [k for k in self.sample_keys if k not in NOT_SERVED]

    @property
    def input_key(self) -> str:
        """``image`` when samples have one, else their first field."""
        fields = self.fields
        return "image" if "image" in fields else fields[0]

    def field_shape(self, key: str, field: str = "model.input_key") -> tuple[int, ...]:
        """Shape of one sample's field ``key`` (not counting the (T, N*K) dimensions)."""
        return self.stream.field_shape(key, field)

    @property
    def num_classes(self) -> int:
        """Classes of the whole stream (one more than its largest label)."""
        return self.stream.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.stream.class_names

    @property
    def meta_train_classes(self) -> list[int]:
        return list(self.splits["train"])

    @property
    def meta_val_classes(self) -> list[int] | None:
        return None if self.splits["val"] is None else list(self.splits["val"])

    @property
    def meta_test_classes(self) -> list[int]:
        return list(self.splits["test"])

    @property
    def eval_settings(self) -> list[tuple[int, int]]:
        """``(n_way, k_shot)`` of each test loader, in order (``dataloader_idx``)."""
        return list(self._eval_settings)

    @property
    def train_setting(self) -> tuple[int, int, int]:
        return (self.n_way, self.k_shot, self.q_queries)

    def run_definition(self) -> dict[str, Any]:
        """What of the data defines a run (stored in checkpoints)."""
        return {
            "benchmark": self.benchmark,
            "benchmark_args": dict(self.benchmark_args),
            "sample_keys": list(self.sample_keys),
            "class_splits": {k: v for k, v in self.splits.items()},
            "train_setting": list(self.train_setting),
            "eval_settings": [list(s) for s in self._eval_settings],
        }

    def trainer_settings(self, **user: Any) -> dict[str, Any]:
        """Trainer arguments episodes need: the training loader rebuilt every epoch. A
        loader iterated right after a resume from an end-of-epoch checkpoint still sees the
        finished epoch in ``current_epoch``; rebuilt at each epoch start, it reads the
        running one (the experience schedule's rule, DESIGN.md)."""
        reload = user.get("reload_dataloaders_every_n_epochs")
        if reload not in (None, 0, 1):
            raise ConfigError(
                f"trainer.reload_dataloaders_every_n_epochs: episodes need 1 (fresh episodes "
                f"every epoch, right after a resume too), got {reload}; leave it unset"
            )
        return {"reload_dataloaders_every_n_epochs": 1}

    # -- episodes --------------------------------------------------------------------------
    def meta_batches(
        self,
        split: str,
        setting: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> MetaBatches:
        """This rank's meta-batches of ``split`` (``train``, ``val``, ``test``), for eval
        setting index ``setting``; ``rank``/``world_size`` default to the trainer's."""
        if split not in SPLIT_FIELDS:
            raise ValueError(f"split is one of {list(SPLIT_FIELDS)}, got {split!r}")
        pool = self.pool
        if split not in self._samplers:
            raise ConfigError(f"{SPLIT_FIELDS[split]}: unset, so there are no {split} episodes")
        trainer = self.trainer
        rank = (trainer.global_rank if trainer else 0) if rank is None else rank
        world_size = (trainer.world_size if trainer else 1) if world_size is None else world_size
        if split == "train":
            setting_, seed, count = self.train_setting, run_seed(self.seed), self.train_episodes
        else:
            n, k = self._eval_settings[setting]
            setting_, seed, count = (n, k, self.q_queries), self.eval_seed, self.eval_episodes
        return MetaBatches(
            pool, self._samplers[split], self.fields, split, setting_, seed, count,
            self.tasks_per_batch, rank, world_size,
        )  # fmt: skip

    def _loader(self, batches: MetaBatches, epoch: Callable[[], int]) -> DataLoader:
        return DataLoader(
            batches,
            batch_size=None,
            sampler=EpochKeys(len(batches), epoch),
            num_workers=self.num_workers,
            generator=fixed_generator(),
            persistent_workers=False,
        )

    def _epoch(self) -> int:
        trainer = self.trainer
        return trainer.current_epoch if trainer is not None else 0

    def prepare_data(self) -> None:
        self.stream.prepare_data()

    def setup(self, stage: str) -> None:
        self.pool  # noqa: B018 - builds the stream and checks the splits and settings

    def train_dataloader(self, epoch: int | None = None) -> DataLoader:
        """Training meta-batches of the running epoch (or of ``epoch``), read when the loader
        is built: with ``trainer_settings`` it is built at every epoch start."""
        epoch = self._epoch() if epoch is None else epoch
        return self._loader(self.meta_batches("train"), lambda: epoch)

    def val_dataloader(self) -> list[DataLoader]:
        if self.splits["val"] is None:
            return []
        return [self._loader(self.meta_batches("val", 0), lambda: 0)]

    def test_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(self.meta_batches("test", i), lambda: 0)
            for i in range(len(self._eval_settings))
        ]
