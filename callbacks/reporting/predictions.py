"""What ``mneme predict`` predicts, one JSON line per sample, written as the batches come.

Why JSON Lines and not Parquet: it needs no extra dependency (Parquet needs pyarrow, ~100
MB, which nothing else in Mneme uses); it streams: each batch's rows are appended when the
batch is predicted, so memory stays flat however many samples there are, and a run stopped
halfway leaves every row written so far readable; and every tool reads it:
``pandas.read_json(path, lines=True)``, DuckDB's ``read_json_auto(path)``, ``jq``, or a
Python loop line by line. Its cost, text floats (larger files than Parquet's), matters only
for embeddings of many samples.

Each row is what the module's ``predict_step`` returns for a sample (a list of plain dicts,
one per sample: the classifier's ``predicted``, ``top_classes``, ``top_probabilities``,
``label``, ``task``; the aligner's ``embedding_<modality>``; a language model's ``prompt`` and
``generated``), after where the sample comes from: ``experience`` (the test experience, the
predict dataloader's index) and ``sample`` (its index in that experience), or ``path`` and
``sample`` for ``data.predict_inputs``.
"""

from __future__ import annotations

import heapq
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import require


class RowPredictor(Protocol):
    """A module whose ``predict_step`` returns one plain dict per sample."""

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any: ...


def plain(value: Any) -> Any:
    """JSON for what a row may hold besides plain data: tensors and NumPy values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a prediction row holds a {type(value).__name__}, not plain data")


class PredictionWriter(BasePredictionWriter):
    """Write every prediction to ``<log_dir>/<filename>`` (JSON Lines), batch by batch; the
    ``mneme`` CLI adds it to ``predict`` (``--predictions.top_k 3``), and prints where it
    wrote and how many rows.

    Under DDP each process writes its shard's rows to a file of its own; at the end, the
    first process merges them in ``(experience, sample)`` order (the evaluation shards are
    strided: process ``r`` of ``W`` serves samples ``r, r + W, ...``) and removes them.

    Args:
        filename: a file name (no folder: the run's evaluation folder holds it), ``.jsonl``.
        top_k: how many classes (most probable first) each classifier row lists with their
            probabilities; set on modules that have ``predict_top_k``.
    """

    def __init__(self, filename: str = "predictions.jsonl", top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ConfigError(f"predictions.top_k: at least 1, got {top_k}")
        if Path(filename).name != filename or not filename.endswith(".jsonl"):
            raise ConfigError(
                f"predictions.filename: a file name ending in .jsonl (it goes in the run's "
                f"folder), got {filename!r}"
            )
        self.filename = filename
        self.top_k = top_k
        self.path: Path | None = None
        self.rows = 0
        self._file = None
        self._positions: dict[int, int] = defaultdict(int)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        require(pl_module, RowPredictor, "PredictionWriter")
        if hasattr(pl_module, "predict_top_k"):
            pl_module.predict_top_k = self.top_k

    def _part(self, trainer: Trainer) -> Path:
        """This process's file: the final one, or its shard's under DDP."""
        if trainer.world_size == 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}.jsonl")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir: on every rank
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.filename
        self.rows = 0
        self._positions.clear()
        try:  # "x": a file already there is an earlier command's, never overwritten
            self._file = open(self._part(trainer), "x", encoding="utf-8")  # noqa: SIM115
        except FileExistsError:
            raise ConfigError(
                f"predictions.filename: '{self._part(trainer)}' exists (an earlier run's); "
                "predictions never overwrite it: choose another name"
            ) from None

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, list) or not all(isinstance(r, dict) for r in prediction):
            raise TypeError(
                f"{type(pl_module).__name__}.predict_step returned a "
                f"{type(prediction).__name__}; PredictionWriter writes a list of dicts, "
                "one per sample"
            )
        paths = batch.get("path") if isinstance(batch, dict) else None
        rank, world = trainer.global_rank, trainer.world_size
        lines = []
        for i, row in enumerate(prediction):
            position = self._positions[dataloader_idx]
            self._positions[dataloader_idx] += 1
            where: dict[str, Any] = {"sample": rank + world * position}
            if paths is not None:
                where = {"path": str(paths[i]), **where}
            else:
                where = {"experience": dataloader_idx, **where}
            lines.append(json.dumps({**where, **row}, default=plain, allow_nan=False))
        if lines:
            self._file.write("\n".join(lines) + "\n")
        self.rows += len(lines)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._file.close()
        self._file = None
        if trainer.world_size > 1:
            trainer.strategy.barrier()  # every shard's file is complete
            if trainer.is_global_zero:
                self.rows = merge_shards(self.path, trainer.world_size)
        if trainer.is_global_zero:
            print(f"mneme: wrote {self.rows} predictions to {self.path}", flush=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception) -> None:
        if self._file is not None:  # the rows written so far stay readable
            self._file.close()
            self._file = None


def merge_shards(path: Path, world_size: int) -> int:
    """Merge the per-process files of ``path`` into it, in ``(experience, sample)`` order
    (each is in that order already: a streaming merge), remove them; the row count."""
    parts = [path.with_name(f"{path.stem}.rank{r}.jsonl") for r in range(world_size)]
    files = [open(p, encoding="utf-8") for p in parts]  # noqa: SIM115 - closed below

    def key(line: str) -> tuple:
        row = json.loads(line)
        return row.get("experience", 0), row["sample"]

    rows = 0
    try:
        with open(path, "x", encoding="utf-8") as out:
            for line in heapq.merge(*files, key=key):
                out.write(line)
                rows += 1
    finally:
        for file in files:
            file.close()
    for part in parts:
        part.unlink()
    return rows
