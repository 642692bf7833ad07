"""What every callback reads from or writes into the run, whatever its concern: the process's
rank, the stream's input standardization, the batch key marking replayed rows, and the
rank-0 JSON file in the log folder.

It sits below ``strategies/``, ``training/``, ``reporting/``, ``compression/`` and ``runtime/``
so that those subpackages import none of each other (see the import contracts in
``pyproject.toml``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer

# The batch key Replay records the number of current (not replayed) rows under, with
# ``mark_current_rows: true``, a 0-d long tensor: rows ``[:batch[CURRENT_ROWS]]`` are the
# stream's, the rest replayed. Batch transforms after Replay (e.g. MixUp with ``apply_to:
# current``) read it.
CURRENT_ROWS = "current_rows"


def rank_and_world_size(trainer: Trainer | None) -> tuple[int, int]:
    """``(global_rank, world_size)``; ``(0, 1)`` outside a trainer."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def input_normalization(trainer: Trainer | None, pl_module: LightningModule) -> Any:
    """The ``(mean, std)`` the model's inputs were standardized with, or ``None``: the
    module's ``input_normalization`` hyperparameter, else the stream's declaration."""
    hparams = getattr(pl_module, "hparams", {})
    norm = hparams.get("input_normalization") if hasattr(hparams, "get") else None
    if norm is None and trainer is not None and trainer.datamodule is not None:
        norm = getattr(trainer.datamodule, "input_normalization", None)
    return norm


def write_json(
    trainer: Trainer, name: str, payload: dict[str, Any], log_dir: str | None = None
) -> None:
    """Write ``payload`` as ``<log_dir>/name`` on rank 0; without ``log_dir``, the trainer's
    (on every rank: under DDP, ``trainer.log_dir`` is a collective broadcast)."""
    log_dir = log_dir or trainer.log_dir
    if log_dir is not None and trainer.is_global_zero:
        path = Path(log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, allow_nan=False))
