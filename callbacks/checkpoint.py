"""Checkpoints of a stream: one file per save point."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.datamodules.errors import ConfigError
from mneme.datamodules.schedule import current_experience, is_experience_end

STATE_VERSION = 1


class ExperienceCheckpoint(ModelCheckpoint):
    """``last.ckpt`` at every training-epoch end (to resume from), and ``experience=<k>.ckpt``
    at each experience end, where ``last.ckpt`` is a hard link to it: one copy on disk per
    save point, where Lightning's ``save_last=True`` writes two identical files.

    Saved at the end of the training epoch, after the other callbacks' experience-end
    work (Fisher, replay buffer, teacher), so a run resumed from a boundary has it.
    ``last.ckpt`` is written to a temporary file and renamed, so a kill while saving leaves
    the previous one whole (and never writes through the link into an experience file).

    Args:
        dirpath: the folder; default ``<log_dir>/checkpoints``, as Lightning's.
        keep_experiences: how many experience checkpoints to keep, newest first (``None``:
            all; ``0``: none, only ``last.ckpt``).
        save_weights_only: as Lightning's (a resume then restarts the optimizer).

    Example (YAML, the CLI's ``checkpoint:`` key)::

        checkpoint:
          keep_experiences: 2
    """

    def __init__(
        self,
        dirpath: str | None = None,
        keep_experiences: int | None = None,
        save_weights_only: bool = False,
    ) -> None:
        if keep_experiences is not None and keep_experiences < 0:
            raise ConfigError(
                f"checkpoint.keep_experiences: must be >= 0 or null (all), got {keep_experiences}"
            )
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            save_on_train_epoch_end=True,
            save_weights_only=save_weights_only,
        )
        self.keep_experiences = keep_experiences
        self.experience_paths: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if "://" in str(self.dirpath) and not str(self.dirpath).startswith("file://"):
            raise ConfigError(
                f"checkpoint.dirpath: '{self.dirpath}' is not a local folder; experience "
                "checkpoints link files on a local disk"
            )

    # Lightning's step- and validation-triggered saves are off: one save per epoch end.
    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        folder = Path(self.dirpath)
        last = folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        self.last_model_path = str(last)  # before saving: it is part of the saved state
        path, stale = last.with_name(last.name + ".tmp"), []
        if is_experience_end(trainer) and self.keep_experiences != 0:
            path = folder / f"experience={current_experience(trainer)}{self.FILE_EXTENSION}"
            if str(path) not in self.experience_paths:
                self.experience_paths.append(str(path))
            if self.keep_experiences is not None:
                stale = self.experience_paths[: -self.keep_experiences]
                self.experience_paths = self.experience_paths[-self.keep_experiences :]
        trainer.save_checkpoint(path, self.save_weights_only)
        if trainer.is_global_zero:
            _replace(path, last)
            for old in stale:
                Path(old).unlink(missing_ok=True)
        trainer.strategy.barrier("ExperienceCheckpoint")

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "version": STATE_VERSION,
            "experience_paths": list(self.experience_paths),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.experience_paths = list(state_dict.get("experience_paths", []))


def _replace(source: Path, last: Path) -> None:
    """Make ``last`` hold ``source``: a rename of a temporary file, or a hard link to an
    experience checkpoint (a copy where the file system has no hard links)."""
    if source.name.endswith(".tmp"):
        os.replace(source, last)
        return
    tmp = last.with_name(last.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, last)
