"""What every batch augmentation shares: the batch transform it registers, the rows it
augments, and its per-step seed.

Each callback registers a batch transform (:meth:`ContinualModule.add_batch_transform`),
which runs in the order of ``trainer.callbacks``: put it **after** ``Replay`` and the
replayed rows are in the batch when it runs. ``apply_to: all`` (the default) augments them
as the current ones; ``apply_to: current`` leaves them as they are, reading the number of
current rows Replay records under ``batch["current_rows"]``
(:data:`mneme.callbacks.run_context.CURRENT_ROWS`, with Replay's ``mark_current_rows: true``,
which ``apply_to: current`` asks for).

Randomness is stateless, as Replay's: a step's draw comes from ``(seed, rank, global_step,
batch_idx)``, so a resumed run augments exactly as an uninterrupted one and there is no RNG
state to checkpoint.
"""

from __future__ import annotations

import zlib

from lightning.pytorch import Callback, LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import Batch, StrategyHost, require
from mneme.app.core.seeding import derive_seed, run_seed
from mneme.callbacks.base import ChangesTraining
from mneme.callbacks.run_context import CURRENT_ROWS

APPLY_TO = ("all", "current")


def check_current_rows(trainer: Trainer, who: str) -> None:
    """``apply_to: current`` needs every Replay to mark the current rows."""
    for callback in trainer.callbacks:  # Replay's setting, read without importing strategies
        if getattr(callback, "mark_current_rows", None) is False:
            raise ConfigError(
                f"Replay.mark_current_rows: set it true for {who}.apply_to: current (or use "
                "apply_to: all), so the replayed rows can be told apart"
            )


def current_rows(batch: Batch) -> int:
    """How many leading rows of ``batch`` are the stream's (the rest replayed)."""
    n = len(batch["label"])
    return int(batch[CURRENT_ROWS]) if CURRENT_ROWS in batch else n


class BatchAugmentation(ChangesTraining, Callback):
    """Registers :meth:`augment` as a batch transform and picks its rows and its seed."""

    name = "augment"
    protocol: type = StrategyHost

    def __init__(self, apply_to: str, input_key: str, seed: int | None) -> None:
        if apply_to not in APPLY_TO:
            raise ConfigError(
                f"{type(self).__name__}.apply_to: one of {list(APPLY_TO)}, got '{apply_to}'"
            )
        self.apply_to = apply_to
        self.input_key = input_key
        self.seed = seed
        self._trainer: Trainer | None = None
        self._transform: str | None = None

    def rows(self, batch: Batch) -> int:
        """The number of leading rows to augment."""
        return len(batch[self.input_key]) if self.apply_to == "all" else current_rows(batch)

    def step_seed(self, batch_idx: int) -> int:
        trainer = self._trainer
        rank = trainer.global_rank if trainer is not None else 0
        step = trainer.global_step if trainer is not None else 0
        return derive_seed(
            run_seed(self.seed), rank, step, batch_idx, zlib.crc32(self.name.encode())
        )

    def augment(self, batch: Batch, batch_idx: int = 0) -> Batch:
        raise NotImplementedError

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        require(pl_module, self.protocol, type(self).__name__)
        if self.apply_to == "current":
            check_current_rows(trainer, type(self).__name__)
        self._transform = pl_module.add_batch_transform(self.name, self.augment)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._transform is not None:
            pl_module.remove_batch_transform(self._transform)
            self._transform = None
        self._trainer = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(apply_to=self.apply_to, input_key=self.input_key)
