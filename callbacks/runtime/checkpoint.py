"""Checkpoints of a stream: one file per save point."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.app.core.errors import ConfigError
from mneme.app.core.schedule import current_experience, is_experience_end

STATE_VERSION = 1


class ExperienceCheckpoint(ModelCheckpoint):
    """``last.ckpt`` at every training-epoch end (to resume from), and ``experience=<k>.ckpt``
    at each experience end, where ``last.ckpt`` is a hard link to it: one copy on disk per
    save point, where Lightning's ``save_last=True`` writes two identical files.

    Saved at the end of the training epoch, after the other callbacks' experience-end
    work (Fisher, replay buffer, teacher), so a run resumed from a boundary has it.
    Every file is written atomically *on the destination file system*: Lightning's writer
    stages a checkpoint in ``TMPDIR`` and copies it over when that is another file system
    (a tmpfs: the common Linux case), which a kill can cut halfway; here it writes a
    temporary file in the checkpoint folder, fsyncs it and renames it, so a kill while
    saving leaves the previous ``last.ckpt`` whole (and never writes through the link into
    an experience file).

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
        path, stale = last, []
        if is_experience_end(trainer) and self.keep_experiences != 0:
            path = folder / f"experience={current_experience(trainer)}{self.FILE_EXTENSION}"
            if str(path) not in self.experience_paths:
                self.experience_paths.append(str(path))
            if self.keep_experiences is not None:
                stale = self.experience_paths[: -self.keep_experiences]
                self.experience_paths = self.experience_paths[-self.keep_experiences :]
        self._save_atomically(trainer, path)
        if trainer.is_global_zero:
            if path != last:  # an experience file: last.ckpt links to it
                _replace(path, last)
            for old in stale:
                Path(old).unlink(missing_ok=True)
        trainer.strategy.barrier("ExperienceCheckpoint")

    def _save_atomically(self, trainer: Trainer, path: Path) -> None:
        """``trainer.save_checkpoint`` into ``path``: written as a temporary file beside it,
        fsynced, then renamed (rank 0 writes; every rank takes part in the save)."""
        tmp = stale_tmp(path)
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                _fsync(tmp)
                os.replace(tmp, path)
                _fsync(path.parent)
        except OSError as error:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
            raise ConfigError(_write_error(error, path)) from None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "version": STATE_VERSION,
            "experience_paths": list(self.experience_paths),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.experience_paths = list(state_dict.get("experience_paths", []))


def stale_tmp(path: Path) -> Path:
    """The temporary file a save of ``path`` writes first (a leftover of a killed save)."""
    return path.with_name(path.name + ".tmp")


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries after a rename) to its disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(error: OSError, path: Path) -> str:
    """One line for a failed save, naming the folder that could not take it (a full
    ``TMPDIR``, where Lightning stages checkpoints, named as such)."""
    import errno
    import tempfile

    reason = error.strerror or str(error)
    staged = error.filename and str(error.filename).startswith(tempfile.gettempdir())
    if error.errno == errno.ENOSPC and staged:
        return (
            f"TMPDIR: no space left in '{tempfile.gettempdir()}', where the checkpoint "
            f"'{path}' is staged; free space there or set TMPDIR to a larger folder"
        )
    return (
        f"checkpoint.dirpath: cannot write '{path}' ({reason}) in '{path.parent}'; free "
        "space there or set checkpoint.dirpath (or trainer.logger.init_args.save_dir) to "
        "another disk"
    )


def _replace(source: Path, last: Path) -> None:
    """Make ``last`` hold ``source``: a rename of a temporary file, or a hard link to an
    experience checkpoint (a copy where the file system has no hard links)."""
    tmp = stale_tmp(last)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, last)
    _fsync(last.parent)
