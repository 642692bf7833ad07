"""Experience replay: a buffer of raw past samples appended to every training batch."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import StrategyHost, require
from mneme.app.core.seeding import keyed_generator, run_seed
from mneme.callbacks.base import ExperienceCallback
from mneme.callbacks.run_context import CURRENT_ROWS, rank_and_world_size
from mneme.callbacks.strategies.buffer_policies import BUFFER_POLICIES, NEEDS_LABELS
from mneme.datamodules.data.experiences import ExperienceData, as_experience
from torch import Tensor

Batch = dict[str, Tensor]
# 1: the layout of mneme 0.1.0 plus this field (0.1.0's checkpoints, without it, load as is);
# 2: one buffer per rank (``ranks``), gathered when the checkpoint is written.
STATE_VERSION = 2


class Replay(ExperienceCallback):
    """Rehearsal: keep raw samples of past experiences and train on them with the new ones.

    At the end of each experience the buffer is updated from that experience's training
    data (``datamodule.train_experiences[k]``, every field, e.g. ``image``/``text``/
    ``label``/``task``); only the samples kept are read. During training, each batch becomes
    the current batch plus ``replay_batch_size`` buffer samples drawn uniformly without
    replacement (with replacement only when the buffer is smaller), every key concatenated,
    on the device, before the forward pass (the module's ``batch_transforms``). Experience 0
    trains on its own data.

    Policies (as Avalanche's storage policies; each sample gets a uniform random weight when
    it is first offered, and the buffer keeps the highest weights):

    - ``reservoir``: the ``buffer_size`` highest weights over everything seen, i.e. a uniform
      sample of the whole stream so far (Avalanche's ``ReservoirSamplingBuffer``).
    - ``class_balanced``: ``buffer_size // n_seen_classes`` per class (the remainder to the
      smallest class ids), a reservoir within each class (Avalanche's ``ClassBalancedBuffer``
      with ``adaptive_size=True``).

    Randomness is stateless: the weights of experience ``k`` come from ``(seed, rank, k)``,
    the replay draw of a step from ``(seed, rank, global_step, batch_idx)``, so a resumed
    run draws exactly what an uninterrupted one would.

    Under DDP each rank keeps a buffer of its own shard of each experience (indices
    ``rank::world_size``, the training loader's sharding) and ``buffer_size`` is **per rank**:
    the global memory is ``world_size * buffer_size``.

    Args:
        buffer_size: samples kept (per rank).
        policy: a name of :mod:`mneme.callbacks.strategies.buffer_policies` (``reservoir``,
            ``class_balanced``, or one registered with ``buffer_policy``).
        replay_batch_size: buffer samples appended to each training batch (Avalanche's
            ``batch_size_mem``); default as many as the batch holds (the datamodule's
            ``batch_size``, fewer in an experience's last, or only, partial batch).
        buffer_device: where the buffer lives; default the training device.
        label_key: the batch key of the class label (for ``class_balanced``).
        seed: base seed of the buffer weights and replay draws; default the run's
            (``seed_everything``).
        mark_current_rows: record the number of current rows under ``batch["current_rows"]``
            (:data:`CURRENT_ROWS`), for transforms that treat replayed rows apart.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.Replay
              init_args: {buffer_size: 500, policy: class_balanced}
    """

    def __init__(
        self,
        buffer_size: int = 500,
        policy: str = "reservoir",
        replay_batch_size: int | None = None,
        buffer_device: str | None = None,
        label_key: str = "label",
        seed: int | None = None,
        mark_current_rows: bool = False,
    ) -> None:
        if buffer_size < 1:
            raise ConfigError(f"Replay.buffer_size: must be at least 1, got {buffer_size}")
        if policy not in BUFFER_POLICIES:
            raise ConfigError(
                f"Replay.policy: one of {sorted(BUFFER_POLICIES)}, got '{policy}' (a new "
                "policy is registered with "
                "mneme.callbacks.strategies.buffer_policies.buffer_policy)"
            )
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ConfigError(
                f"Replay.replay_batch_size: must be at least 1, got {replay_batch_size}"
            )
        self._transform: str | None = None  # the name the module gave our extension point
        self.buffer_size = buffer_size
        self.policy = policy
        self.replay_batch_size = replay_batch_size
        self.buffer_device = buffer_device
        self.label_key = label_key
        self.seed = seed
        self.mark_current_rows = mark_current_rows
        self.buffer: Batch = {}
        self.weights = torch.zeros(0)
        self.experiences: list[int] = []
        self._trainer: Trainer | None = None

    def __len__(self) -> int:
        return len(self.weights)

    # -- buffer ---------------------------------------------------------------------------
    def update(
        self, data: ExperienceData | Batch, experience: int, rank: int = 0, world_size: int = 1
    ) -> None:
        """Offer this rank's shard of one experience to the buffer: only the samples the
        policy keeps are read (labels come from the experience's metadata)."""
        if experience in self.experiences:  # already in (e.g. the state came from a checkpoint)
            return
        data = as_experience(data)
        shard = torch.arange(rank, len(data), world_size)
        new_weights = torch.rand(
            len(shard), generator=keyed_generator(run_seed(self.seed), rank, experience)
        )
        weights = torch.cat([new_weights, self.weights.cpu()])
        labels = None
        if self.policy in NEEDS_LABELS:  # reservoir needs no label: any keys will do
            old_labels = self.buffer.get(self.label_key, shard[:0])
            labels = torch.cat([self._labels(data, shard), old_labels.cpu()])
        # Ascending, so that the kept new samples come first, as in the concatenation below.
        keep = BUFFER_POLICIES[self.policy](weights, labels, self.buffer_size).sort().values
        new, old = keep[keep < len(shard)], keep[keep >= len(shard)] - len(shard)
        fresh = data.read(shard[new]) if len(new) else {}
        device = self._device(fresh or self.buffer)
        old_tensors = self.buffer or {key: value[:0] for key, value in fresh.items()}
        fresh = fresh or {key: value[:0] for key, value in old_tensors.items()}
        self.buffer = {
            key: torch.cat(
                [
                    value.to(device),
                    old_tensors[key].to(device).index_select(0, old.to(device)),
                ]
            )
            for key, value in fresh.items()
        }
        self.weights = weights[keep]
        self.experiences.append(experience)

    def _labels(self, data: ExperienceData, shard: Tensor) -> Tensor:
        if self.label_key not in data.fields():
            raise ConfigError(f"Replay.policy: {self.policy} needs '{self.label_key}' in the data")
        if self.label_key == "label":
            return data.labels().cpu()[shard]  # metadata: no sample is read
        return data.read(shard)[self.label_key].cpu()

    def _device(self, tensors: Batch) -> torch.device:
        if self.buffer_device is not None:
            return torch.device(self.buffer_device)
        if self._trainer is not None:
            return self._trainer.strategy.root_device
        return next(iter(tensors.values())).device

    def sample(self, n: int, *keys: int) -> Tensor:
        """``n`` buffer indices, uniform without replacement (with, if the buffer is smaller),
        from a generator seeded by ``keys``."""
        generator = keyed_generator(run_seed(self.seed), *keys)
        if n <= len(self):
            return torch.randperm(len(self), generator=generator)[:n]
        return torch.randint(len(self), (n,), generator=generator)

    # -- the batch transform --------------------------------------------------------------
    def replay(self, batch: Batch, batch_idx: int = 0) -> Batch:
        """Append ``replay_batch_size`` buffer samples to ``batch`` (every key)."""
        if not len(self):
            return batch
        missing = set(batch) - set(self.buffer) - {CURRENT_ROWS}
        if missing:
            raise ConfigError(
                f"Replay: the batch has keys {sorted(missing)} that the buffer lacks "
                f"(buffer keys: {sorted(self.buffer)})"
            )
        trainer = self._trainer
        rank, _ = rank_and_world_size(trainer)
        # (global_step, batch_idx): unique per training batch, restored on resume.
        step = (trainer.global_step if trainer else 0, batch_idx)
        # As many as the batch holds by default: a batch_size larger than the experience
        # gives a smaller batch, and the replayed share follows it.
        n = self.replay_batch_size or len(next(iter(batch.values())))
        index = self.sample(n, rank, *step)
        device = next(iter(self.buffer.values())).device
        return self.append(batch, index.to(device, non_blocking=True))

    def append(self, batch: Batch, index: Tensor) -> Batch:
        """``batch`` with the buffer rows ``index`` appended to every key. Apart from the
        draw (a seeded host generator per step, which torch.compile cannot trace), so that
        this part traces without a graph break (tests/test_compile.py)."""
        out = {}
        for key, value in batch.items():
            if key != CURRENT_ROWS:
                out[key] = torch.cat([value, self.buffer[key].index_select(0, index).to(value)])
        if self.mark_current_rows or CURRENT_ROWS in batch:
            current = len(next(iter(batch.values())))
            out[CURRENT_ROWS] = batch.get(CURRENT_ROWS, torch.tensor(current))
        return out

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        require(pl_module, StrategyHost, "Replay")
        self._transform = pl_module.add_batch_transform("replay", self.replay)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._transform is not None:
            pl_module.remove_batch_transform(self._transform)
            self._transform = None
        self._trainer = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A buffer restored from a checkpoint arrives on the CPU: move it to its device once.
        if self.buffer:
            device = self._device(self.buffer)
            self.buffer = {key: value.to(device) for key, value in self.buffer.items()}

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        data = trainer.datamodule.train_experiences[experience]
        self.update(data, experience, *rank_and_world_size(trainer))

    # -- state ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.policy, buffer_size=self.buffer_size)

    def state_dict(self) -> dict[str, Any]:
        """Every rank's buffer (each rank keeps a buffer of its own shard): gathered here,
        since Lightning asks every rank for its state and rank 0 writes the file."""
        own = {
            "buffer": {key: value.cpu() for key, value in self.buffer.items()},
            "weights": self.weights.cpu(),
        }
        return {
            "version": STATE_VERSION,
            "ranks": self._gather(own),
            "experiences": list(self.experiences),
            "policy": self.policy,
            "buffer_size": self.buffer_size,
        }

    def _gather(self, own: dict[str, Any]) -> list[dict[str, Any]]:
        _, world_size = rank_and_world_size(self._trainer)
        if world_size == 1:
            return [own]
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, own)
        return gathered

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["policy"] != self.policy or state_dict["buffer_size"] != self.buffer_size:
            raise ConfigError(
                f"Replay: the checkpoint's buffer is {state_dict['policy']} of size "
                f"{state_dict['buffer_size']}, this callback {self.policy} of {self.buffer_size}"
            )
        own = state_dict  # version 1 (mneme 0.1.0): one buffer, the one rank 0 held
        if "ranks" in state_dict:
            rank, world_size = rank_and_world_size(self._trainer)
            ranks = state_dict["ranks"]
            if len(ranks) != world_size:
                raise ConfigError(
                    f"Replay: the checkpoint holds the buffers of {len(ranks)} processes "
                    f"(each keeps its own shard's), this run has {world_size}; resume with "
                    f"--trainer.devices {len(ranks)} (and as many nodes)"
                )
            own = ranks[rank]
        self.buffer = dict(own["buffer"])
        self.weights = own["weights"]
        self.experiences = list(state_dict["experiences"])
