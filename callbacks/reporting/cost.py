"""What each experience of a run costs: parameters, training time, peak memory, the size of
its weights and of its checkpoint file."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from mneme.app.core.errors import ConfigError
from mneme.app.core.schedule import current_experience, is_experience_end, is_experience_start

STATE_VERSION = 2  # 1: weights_bytes was named checkpoint_bytes, no checkpoint_file_bytes
# One row per experience, in this order (the JSON's ``cost`` list and the printed table).
COST_FIELDS = (
    "experience",
    "trainable_params",
    "total_params",
    "train_seconds",
    "peak_memory_bytes",
    "peak_memory_kind",
    "weights_bytes",
    "checkpoint_file_bytes",
)
MB = 2**20  # the ``*_mb`` scalars and the printed table are in MiB


class ExperienceCost(Callback):
    """Measures, for each experience ``k`` of a ``fit``, what training it cost, in ``rows``
    (one dict per experience, fields :data:`COST_FIELDS`):

    - ``trainable_params`` / ``total_params``: the module's parameters that require a
      gradient, and all of them (``numel``, each shared parameter once), counted when the
      experience's training ends: freezing, unfreezing or PEFT show up in the experience
      they applied to.
    - ``train_seconds``: wall time of the experience's training epochs, each from its
      ``on_train_epoch_start`` to the end of its last training batch (loading, forward,
      backward, optimizer steps, per-batch hooks). Validation, the strategies' work at the
      epoch end (Fisher, buffer update) and checkpoint saving are not included.
    - ``peak_memory_bytes`` with ``peak_memory_kind``: on CUDA (``"cuda"``),
      ``torch.cuda.max_memory_allocated`` since the experience's first epoch started
      (the peak is reset there; tensors only, the caching allocator reserves more); anywhere
      else (``"cpu_rss"``), the process's peak resident set size (``getrusage``), which is a
      peak *since the process started* and cannot be reset: it never decreases from one
      row to the next, and counts neither data-loader workers nor other processes.
      Both are read when the experience's training ends, so they include any validation
      inside the experience (``data.validate_each_epoch``) but not the one at its end.
    - ``weights_bytes``: the bytes the model's weights take in a checkpoint: the size of
      ``torch.save`` of the module's ``state_dict()`` as its own ``on_save_checkpoint``
      leaves it (a module may drop tensors there, e.g. a frozen pretrained backbone that a
      load rebuilds from its source), measured without writing a file or holding a copy:
      what deploying the model takes. ``None`` with ``checkpoint_size=False``.
    - ``checkpoint_file_bytes``: the size on disk (``os.path.getsize``) of the checkpoint
      file saved at the experience's end (``experience=<k>.ckpt`` of the trainer's
      checkpoint callback, or ``last.ckpt`` while it holds that save): the weights plus the
      optimizer state, the callbacks' states (a replay buffer, a teacher, Fisher
      information) and the loops'. Read once the file is written (at the next epoch's
      start, or the fit's end); ``None`` when the run saves no such file.

    Under DDP, ``train_seconds`` and ``peak_memory_bytes`` are the maximum over ranks (the
    slowest rank, the fullest device); parameters and weights are the same on every rank.
    (Under FSDP the counts are those of the rank's shard.)

    Each row is logged to every logger as ``cost/trainable_params``, ``cost/total_params``,
    ``cost/train_seconds``, ``cost/peak_memory_mb`` and ``cost/weights_mb`` (MiB) at
    step = experience; ``ContinualMetrics`` finds this callback among the trainer's and
    writes the rows under ``cost`` in ``continual_metrics.json`` and prints them after the
    accuracy matrix. The rows (and the seconds of an experience under way) are part of the
    checkpoint, so a resumed run keeps the rows of the experiences it trained before; an
    experience trained before this callback was in the run gets a row of ``None``.

    Example::

        trainer = Trainer(callbacks=[ContinualMetrics(), ExperienceCost()])
    """

    def __init__(self, checkpoint_size: bool = True) -> None:
        self.checkpoint_size = checkpoint_size
        self.rows: list[dict[str, Any]] = []
        # The experience under way: {"experience": k, "train_seconds": s of its past epochs}.
        self._pending: dict[str, Any] | None = None
        self._epoch_start: float | None = None
        self._last_batch_end: float | None = None

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rows": [dict(row) for row in self.rows],
            "pending": dict(self._pending) if self._pending is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version not in (1, STATE_VERSION):
            raise ConfigError(
                f"ExperienceCost: the checkpoint's cost state has version {version}, this "
                f"mneme reads version {STATE_VERSION}; resume with the mneme that wrote it"
            )
        self.rows = [_current_row(row) for row in state_dict["rows"]]
        pending = state_dict["pending"]
        self._pending = dict(pending) if pending is not None else None

    # -- hooks ----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record_checkpoint_files(trainer)  # the previous experience's, saved by now
        k = current_experience(trainer)
        pending = self._pending
        if is_experience_start(trainer) or pending is None or pending["experience"] != k:
            self._pending = {"experience": k, "train_seconds": 0.0}
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._epoch_start = self._last_batch_end = time.perf_counter()

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._last_batch_end = time.perf_counter()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning validates at the end of a training epoch (before on_train_epoch_end):
        # the experience's training is over, and ContinualMetrics, which writes its JSON at
        # this validation's end, finds the row.
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._end_epoch()
        if is_experience_end(trainer):
            self._finish(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_epoch()  # an epoch that did not validate
        if is_experience_end(trainer) and self._pending is not None:
            self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record_checkpoint_files(trainer)

    # -- measuring ------------------------------------------------------------------------
    def record_checkpoint_files(self, trainer: Trainer) -> None:
        """Fill ``checkpoint_file_bytes`` of the rows whose experience's checkpoint file is
        on disk now: ``experience=<k>.ckpt`` in the checkpoint callback's folder, or, for
        the latest experience only, ``last.ckpt`` (which holds its save until the next
        epoch's end: with ``keep_experiences: 0`` the only file). Call it only between an
        epoch's save and the next epoch's (a training epoch's start, the fit's end): before
        the save, ``last.ckpt`` still holds the previous epoch."""
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None)
        if not folder or not self.rows:
            return
        extension = getattr(callback, "FILE_EXTENSION", ".ckpt")
        last = Path(folder) / f"{getattr(callback, 'CHECKPOINT_NAME_LAST', 'last')}{extension}"
        latest = self.rows[-1]["experience"]
        for row in self.rows:
            if row.get("checkpoint_file_bytes") is not None or row["trainable_params"] is None:
                continue
            path = Path(folder) / f"experience={row['experience']}{extension}"
            if not path.is_file() and row["experience"] == latest and self._pending is None:
                path = last
            if path.is_file():
                row["checkpoint_file_bytes"] = os.path.getsize(path)

    def _end_epoch(self) -> None:
        if self._epoch_start is None or self._pending is None:
            return
        self._pending["train_seconds"] += self._last_batch_end - self._epoch_start
        self._epoch_start = self._last_batch_end = None

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        k = self._pending["experience"]
        parameters = list(pl_module.parameters())
        seconds = self._pending["train_seconds"]
        peak, kind = peak_memory(pl_module.device)
        if trainer.world_size > 1:  # every rank reaches this hook: one collective
            values = torch.tensor(
                [seconds, -1.0 if peak is None else float(peak)],
                dtype=torch.float64,
                device=pl_module.device,
            )
            seconds, peak_max = trainer.strategy.reduce(values, reduce_op="max").tolist()
            peak = None if peak_max < 0 else int(peak_max)
        row = {
            "experience": k,
            "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
            "total_params": sum(p.numel() for p in parameters),
            "train_seconds": seconds,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "weights_bytes": weights_bytes(pl_module) if self.checkpoint_size else None,
            "checkpoint_file_bytes": None,  # the file is saved after this hook
        }
        del self.rows[k:]
        # Experiences trained before this callback was in the run: rows of None.
        self.rows += [empty_row(j) for j in range(len(self.rows), k)]
        self.rows.append(row)
        self._pending = None
        scalars = {key: value for key, value in cost_scalars(row).items() if value is not None}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=k)


def _current_row(row: dict[str, Any]) -> dict[str, Any]:
    """A restored row in this version's fields (version 1 named ``weights_bytes``
    ``checkpoint_bytes`` and had no file size)."""
    row = dict(row)
    if "checkpoint_bytes" in row:
        row["weights_bytes"] = row.pop("checkpoint_bytes")
    row.setdefault("checkpoint_file_bytes", None)
    return row


def empty_row(experience: int) -> dict[str, Any]:
    return {key: experience if key == "experience" else None for key in COST_FIELDS}


def cost_scalars(row: dict[str, Any]) -> dict[str, float | None]:
    """A row as the dashboard's scalars (memory and checkpoint in MiB)."""

    def mb(value: int | None) -> float | None:
        return None if value is None else value / MB

    return {
        "cost/trainable_params": row["trainable_params"],
        "cost/total_params": row["total_params"],
        "cost/train_seconds": row["train_seconds"],
        "cost/peak_memory_mb": mb(row["peak_memory_bytes"]),
        "cost/weights_mb": mb(row["weights_bytes"]),
    }


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """The peak memory this process used, and its kind: ``"cuda"`` (allocated on
    ``device`` since the last reset of its peak) or ``"cpu_rss"`` (the process's peak
    resident set size since it started; ``None`` where ``resource`` is missing: Windows)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda"
    try:
        import resource
    except ImportError:
        return None, "cpu_rss"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024, "cpu_rss"


class _ByteCounter:
    """A write-only file that counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def weights_bytes(pl_module: LightningModule) -> int:
    """The size of the module's weights as a checkpoint keeps them: its ``state_dict()``
    after its ``on_save_checkpoint`` hook (given a checkpoint dict of that state alone; the
    hook only edits the dict it is given), serialized."""
    checkpoint: dict[str, Any] = {"state_dict": pl_module.state_dict()}
    pl_module.on_save_checkpoint(checkpoint)
    return serialized_bytes(checkpoint["state_dict"])


def serialized_bytes(obj: Any) -> int:
    """The size of ``torch.save(obj)``, without writing a file or keeping the bytes."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.size


def format_cost(rows: list[dict[str, Any]]) -> str:
    """The cost rows as a text table, one line per experience (n/a: not measured)."""

    def cell(value: Any, spec: str, width: int) -> str:
        return f"{'n/a':>{width}}" if value is None else f"{value:{width}{spec}}"

    kinds = {row["peak_memory_kind"] for row in rows} - {None}
    memory = {
        "cuda": "peak MB: CUDA max allocated in the experience",
        "cpu_rss": "peak MB: process peak RSS since it started",
    }
    notes = [memory[kind] for kind in sorted(kinds) if kind in memory]
    notes += [
        "weights MB: the model's weights as a checkpoint holds them (what a deployment loads)",
        "ckpt file MB: the experience's checkpoint file on disk (the weights, optimizer and "
        "callback states)",
    ]
    lines = ["Cost per experience (MB: MiB)"]
    header = (
        f"{'exp':>9} | {'trainable':>11} {'total':>11} {'train s':>9} {'peak MB':>9} "
        f"{'weights MB':>10} {'ckpt file MB':>12}"
    )
    lines += [header, "-" * len(header)]
    for row in rows:
        peak, weights = row["peak_memory_bytes"], row["weights_bytes"]
        file = row["checkpoint_file_bytes"]
        lines.append(
            f"{row['experience']:>9} | "
            + " ".join(
                [
                    cell(row["trainable_params"], "d", 11),
                    cell(row["total_params"], "d", 11),
                    cell(row["train_seconds"], ".2f", 9),
                    cell(None if peak is None else peak / MB, ".1f", 9),
                    cell(None if weights is None else weights / MB, ".3f", 10),
                    cell(None if file is None else file / MB, ".3f", 12),
                ]
            )
        )
    return "\n".join(lines + notes)
