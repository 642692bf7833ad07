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
        keep_experiences: how many of *this run's* experience checkpoints to keep, newest
            first (``None``: all; ``0``: none, only ``last.ckpt``). Only files this run
            wrote, in its own ``dirpath``, are ever removed: the list of paths a restored
            checkpoint carries is a record, never a list of files to delete (a crafted
            checkpoint could name any file, and an earlier run's files stay untouched).
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
        self.experience_paths: list[str] = []  # this run's experience files, oldest first
        # What a restored checkpoint listed: reported in the state, never deleted.
        self.earlier_experience_paths: list[str] = []

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
                self._remove_own(Path(old))
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

    def _remove_own(self, path: Path) -> None:
        """Unlink an experience checkpoint this run wrote: a plain file directly in this
        run's ``dirpath`` (checked again here, so that no list, however it was filled, can
        reach another folder or follow a link out of it)."""
        folder = Path(self.dirpath).resolve()
        if path.is_symlink() or path.resolve().parent != folder or not path.is_file():
            return
        path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "version": STATE_VERSION,
            "experience_paths": [*self.earlier_experience_paths, *self.experience_paths],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
        # Else a checkpoint of another folder (`mneme test` of it, or a resume into a
        # folder of its own): Lightning's would warn on every such run that its best-k
        # record "won't be reloaded", a record that holds nothing here (save_top_k=0).
        # A record of the files an earlier run wrote (in its own folder): kept in this
        # run's checkpoints as plain strings, never trusted for writing or deleting.
        paths = state_dict.get("experience_paths", [])
        self.earlier_experience_paths = [p for p in paths if isinstance(p, str)][-1000:]
        self.experience_paths = []


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
    # Staged in TMPDIR only when the failing file is there and not in the checkpoint folder
    # (a log folder below /tmp is the checkpoint's own disk, not the staging area).
    failing = Path(str(error.filename)).resolve() if error.filename else None
    in_folder = failing is not None and failing.parent == path.parent.resolve()
    tmp_root = Path(tempfile.gettempdir()).resolve()
    staged = failing is not None and not in_folder and failing.is_relative_to(tmp_root)
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
