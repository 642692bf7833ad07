"""The cost report per experience (ExperienceCost): parameters, training time, peak memory
and checkpoint size, in the rows, on the loggers, in continual_metrics.json and the printed
table, and across a resume."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from mneme.app import ContinualClassifier
from mneme.app.core.schedule import current_experience
from mneme.callbacks import ContinualMetrics, ExperienceCost
from mneme.callbacks.reporting.cost import (
    COST_FIELDS,
    STATE_VERSION,
    format_cost,
    serialized_bytes,
)
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import digits_stream, quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
# the resumes below leave out callbacks of the run that wrote the checkpoint, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint")


class FreezeEncoderFrom(Callback):
    """Freezes the encoder from experience ``k`` on (as a progressive-freezing strategy)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if current_experience(trainer) >= self.k:
            pl_module.encoder.requires_grad_(False)


class Recorder(Logger):
    """A logger that keeps what it is given (the run's JSON goes to ``save_dir``)."""

    def __init__(self, save_dir) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []
        self._save_dir = str(save_dir)

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))


def fit(tmp_path, *callbacks, epochs: int = 1, ckpt_path=None, **trainer_args):
    seed_everything(0)
    model = ContinualClassifier(encoder="mneme_mlp", encoder_args={"hidden": [8]})
    data = ContinualDataModule(
        **digits_stream(2), epochs_per_experience=epochs, batch_size=128, eval_batch_size=1024
    )
    trainer = quiet_trainer(data, tmp_path, callbacks, **trainer_args)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model


def test_rows_follow_freezing_and_reach_json_loggers_and_table(tmp_path, capsys):
    cost, recorder = ExperienceCost(), Recorder(tmp_path)
    _, model = fit(
        tmp_path, ContinualMetrics(), cost, FreezeEncoderFrom(1), epochs=2, logger=recorder
    )
    rows = cost.rows
    assert [row["experience"] for row in rows] == [0, 1]
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert 0 < encoder < total
    assert [row["total_params"] for row in rows] == [total, total]
    # experience 0 trained everything, experience 1 only the head
    assert [row["trainable_params"] for row in rows] == [total, total - encoder]
    for row in rows:
        assert set(row) == set(COST_FIELDS)
        assert 0 < row["train_seconds"] < 60
        assert row["peak_memory_kind"] == "cpu_rss" and row["peak_memory_bytes"] > 2**20
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert row["weights_bytes"] == len(buffer.getvalue()) > weights
    # the process's peak RSS since it started never decreases
    assert rows[1]["peak_memory_bytes"] >= rows[0]["peak_memory_bytes"]

    metrics = json.loads((tmp_path / "continual_metrics.json").read_text())
    assert metrics["cost"] == rows and len(metrics["accuracy_matrix"]) == 2

    logged = {step: m for step, m in recorder.metrics if "cost/train_seconds" in m}
    assert sorted(logged) == [0, 1]
    for k, row in enumerate(rows):
        assert logged[k]["cost/trainable_params"] == row["trainable_params"]
        assert logged[k]["cost/train_seconds"] == row["train_seconds"]
        assert logged[k]["cost/peak_memory_mb"] == pytest.approx(row["peak_memory_bytes"] / 2**20)
        assert logged[k]["cost/weights_mb"] == pytest.approx(row["weights_bytes"] / 2**20)

    out = capsys.readouterr().out
    assert out.index("Accuracy matrix") < out.index("Cost per experience")
    assert f"{total - encoder:>11} {total:>11}" in out  # experience 1's parameter columns


def test_train_seconds_sum_the_experience_epochs_and_leave_out_validation(tmp_path, monkeypatch):
    """On a clock that only the test moves (each training batch 1 s, each validation
    1000 s): an experience's seconds are exactly its batches of both epochs, and none of its
    validation. No wall-clock figure, so a busy machine cannot fail it."""
    import types

    from mneme.callbacks.reporting import cost as cost_module

    now = [0.0]
    monkeypatch.setattr(cost_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    class Clock(Callback):
        def __init__(self) -> None:
            self.batches = [0, 0]

        def on_train_batch_start(self, trainer, *args) -> None:
            self.batches[current_experience(trainer)] += 1
            now[0] += 1.0

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            now[0] += 1000.0

    clock, cost = Clock(), ExperienceCost(checkpoint_size=False)
    fit(tmp_path, clock, cost, epochs=2)
    for row, batches in zip(cost.rows, clock.batches, strict=True):
        assert batches >= 2 * 2  # two epochs of at least two batches
        assert row["train_seconds"] == pytest.approx(batches)
        assert row["weights_bytes"] is None


def test_a_resumed_run_keeps_the_rows_and_the_seconds_under_way(tmp_path):
    ckpts = tmp_path / "ckpts"
    every_epoch = ModelCheckpoint(
        dirpath=ckpts, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
    )
    reference = ExperienceCost()
    metrics = ContinualMetrics(print_table=False)
    fit(tmp_path, metrics, reference, every_epoch, epochs=2, enable_checkpointing=True)

    # from the end of experience 0: its row is the checkpoint's, experience 1's is new
    boundary = next(ckpts.glob("epoch=1-*.ckpt"))
    resumed = ExperienceCost()
    fit(tmp_path / "boundary", ContinualMetrics(print_table=False), resumed, ckpt_path=boundary,
        epochs=2)  # fmt: skip
    assert resumed.rows[0] == reference.rows[0]
    assert [row["experience"] for row in resumed.rows] == [0, 1]
    assert resumed.rows[1]["train_seconds"] > 0
    written = json.loads((tmp_path / "boundary" / "continual_metrics.json").read_text())
    assert written["cost"] == resumed.rows

    # from inside experience 0: its first epoch's seconds come from the checkpoint
    inside = next(ckpts.glob("epoch=0-*.ckpt"))
    state = torch.load(inside, weights_only=True)["callbacks"]["ExperienceCost"]
    assert state["version"] == STATE_VERSION and state["rows"] == []
    assert state["pending"]["experience"] == 0 and state["pending"]["train_seconds"] > 0
    resumed = ExperienceCost()
    fit(tmp_path / "inside", resumed, ckpt_path=inside, epochs=2)
    assert resumed.rows[0]["train_seconds"] > state["pending"]["train_seconds"]

    # a checkpoint without cost state (the callback added on resume): experience 0 is n/a
    checkpoint = torch.load(boundary, weights_only=True)
    del checkpoint["callbacks"]["ExperienceCost"]
    torch.save(checkpoint, tmp_path / "no_cost.ckpt")
    added = ExperienceCost()
    fit(tmp_path / "added", added, ckpt_path=tmp_path / "no_cost.ckpt", epochs=2)
    assert added.rows[0] == {key: 0 if key == "experience" else None for key in COST_FIELDS}
    assert added.rows[1]["trainable_params"] > 0
    assert "n/a" in format_cost(added.rows)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore::DeprecationWarning")
def test_the_cli_measures_cost_in_every_run():
    from mneme.app.cli.parser import build_cli

    from tests.test_cli import QUICKSTART

    args = ["--config", str(QUICKSTART), "--trainer.logger", "false"]
    (cost,) = [
        c for c in build_cli(args, run=False).trainer.callbacks if isinstance(c, ExperienceCost)
    ]
    assert cost.checkpoint_size
    trainer = build_cli([*args, "--cost.checkpoint_size", "false"], run=False).trainer
    assert not next(c for c in trainer.callbacks if isinstance(c, ExperienceCost)).checkpoint_size


def test_a_cost_state_of_another_version_is_refused():
    cost = ExperienceCost()
    with pytest.raises(ConfigError, match="version 99"):
        cost.load_state_dict({"version": 99, "rows": [], "pending": None})


def test_a_version_1_cost_state_loads_with_its_weights_renamed():
    row = {key: 1 for key in COST_FIELDS if key not in ("weights_bytes", "checkpoint_file_bytes")}
    cost = ExperienceCost()
    cost.load_state_dict({"version": 1, "rows": [{**row, "checkpoint_bytes": 7}], "pending": None})
    assert cost.rows == [{**row, "weights_bytes": 7, "checkpoint_file_bytes": None}]


@pytest.mark.parametrize("keep_experiences", [None, 0])
def test_checkpoint_file_bytes_are_the_size_of_each_experience_checkpoint_on_disk(
    tmp_path, capsys, keep_experiences
):
    """``experience=<k>.ckpt`` of each experience (``last.ckpt`` for the last one when the
    experience files are not kept), as ``os.path.getsize`` reads it; larger than the
    weights alone (the optimizer and callback states are in the file too)."""
    import os

    from mneme.callbacks import ExperienceCheckpoint

    cost, saver = ExperienceCost(), ExperienceCheckpoint(tmp_path / "ckpts", keep_experiences)
    fit(tmp_path, ContinualMetrics(), cost, saver, epochs=2, enable_checkpointing=True)
    names = ["last.ckpt"] if keep_experiences == 0 else ["experience=0.ckpt", "experience=1.ckpt"]
    sizes = [os.path.getsize(tmp_path / "ckpts" / name) for name in names]
    recorded = [row["checkpoint_file_bytes"] for row in cost.rows]
    assert recorded[-len(sizes) :] == sizes
    if keep_experiences == 0:  # experience 0's state was overwritten before it was read
        assert recorded[0] is None or recorded[0] > 0
    assert all(row["checkpoint_file_bytes"] > row["weights_bytes"] for row in cost.rows[-1:])
    written = json.loads((tmp_path / "continual_metrics.json").read_text())
    assert [row["checkpoint_file_bytes"] for row in written["cost"]] == recorded
    assert f"{sizes[-1] / 2**20:12.3f}" in capsys.readouterr().out


def test_serialized_bytes_is_the_size_of_torch_save():
    state = torch.nn.Linear(7, 3).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert serialized_bytes(state) == len(buffer.getvalue())


def test_under_ddp_time_and_memory_are_the_maximum_over_ranks():
    """Every rank measures its own; the row takes what the strategy's max-reduce returns."""
    from types import SimpleNamespace

    class TwoRanks:
        def reduce(self, tensor, reduce_op):
            assert reduce_op == "max"
            other_rank = torch.tensor([5.0, 3.0 * 2**30], dtype=tensor.dtype)
            return torch.maximum(tensor, other_rank)

    trainer = SimpleNamespace(world_size=2, strategy=TwoRanks(), loggers=[])
    module = LightningModule()
    module.layer = torch.nn.Linear(3, 2)
    cost = ExperienceCost(checkpoint_size=False)
    cost._pending = {"experience": 0, "train_seconds": 1.5}
    cost._finish(trainer, module)
    (row,) = cost.rows
    assert row["train_seconds"] == 5.0 and row["peak_memory_bytes"] == 3 * 2**30
    assert row["total_params"] == row["trainable_params"] == 8


def test_weights_bytes_count_what_the_module_keeps_in_its_checkpoint():
    """A module that leaves its frozen backbone out of its checkpoint (as a pretrained one
    rebuilt from its source on load) is measured without it."""
    from types import SimpleNamespace

    class Backboned(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(64, 64).requires_grad_(False)
            self.head = torch.nn.Linear(64, 2)

        def on_save_checkpoint(self, checkpoint) -> None:
            for key in [k for k in checkpoint["state_dict"] if k.startswith("backbone.")]:
                del checkpoint["state_dict"][key]

    module = Backboned()
    cost = ExperienceCost()
    cost._pending = {"experience": 0, "train_seconds": 1.0}
    cost._finish(SimpleNamespace(world_size=1, loggers=[]), module)
    (row,) = cost.rows
    kept = module.state_dict()  # as a checkpoint holds it (with its version metadata)
    for key in ("backbone.weight", "backbone.bias"):
        del kept[key]
    assert row["weights_bytes"] == serialized_bytes(kept)
    assert row["weights_bytes"] < serialized_bytes(module.state_dict()) / 4
    assert row["trainable_params"] == 64 * 2 + 2 < row["total_params"]
