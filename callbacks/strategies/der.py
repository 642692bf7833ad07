"""DER / DER++ (dark experience replay): a Replay buffer that also keeps logits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import FeatureClassifier, StrategyHost, require
from mneme.callbacks.run_context import rank_and_world_size
from mneme.callbacks.strategies.replay import Replay
from mneme.datamodules.data.experiences import ExperienceData, as_experience
from torch import Tensor

Batch = dict[str, Tensor]
LOGITS_KEY = "der_logits"  # the buffer field that holds the recorded logits


class _WithLogits(ExperienceData):
    """An experience whose samples, when read, gain the model's logits on them
    (``LOGITS_KEY``): Replay reads only the samples its policy keeps, so only those are
    encoded."""

    def __init__(self, data: ExperienceData, logits: Callable[[Batch], Tensor]) -> None:
        self.data, self.logits = data, logits
        self.classes, self.tasks = data.classes, data.tasks

    def __len__(self) -> int:
        return len(self.data)

    def labels(self) -> Tensor:
        return self.data.labels()

    def task_labels(self) -> Tensor:
        return self.data.task_labels()

    def fields(self) -> list[str]:
        return sorted([*self.data.fields(), LOGITS_KEY])

    def batches(self, batch_size: int, index: Tensor | None = None) -> Iterator[Batch]:
        for batch in self.data.batches(batch_size, index):
            yield {**batch, LOGITS_KEY: self.logits(batch)}


class DER(Replay):
    """Dark Experience Replay (Buzzega et al. 2020): DER with ``beta=0``, DER++ otherwise.

    Built on :class:`~mneme.callbacks.strategies.replay.Replay`: the same buffer, policies, seeding,
    per-rank sharding and checkpointing; the buffer gains a field ``der_logits``, the
    model's raw logits (every head, ``head(features(x, task))``) on each kept sample. Instead
    of appending buffer samples to the batch, each training step adds the loss term ``der``::

        alpha * MSE(logits(x1), stored_logits_1) + beta * CE(logits(x2), y2)

    over two independent draws of ``replay_batch_size`` buffer samples (Algorithm 1 of the
    paper), to the module's cross-entropy on the current batch.

    When logits are recorded: Mneme's Replay updates its buffer at the end of each experience
    from that experience's data (samples not kept are never read), so the logits are
    recorded then, by one forward pass (eval mode, no gradient) of the model at the end of
    the experience over the newly kept samples. The paper records them when a sample is seen
    during training (reservoir sampling along the optimisation trajectory); the end-of-
    experience logits are those of the best-trained model of that experience, and no extra
    forward happens during training. They are stored with the samples, so they survive a
    checkpoint (``state_dict`` is Replay's, per rank) and a resume.

    Args:
        alpha: weight of the logit-matching (MSE) term; ``>= 0``.
        beta: weight of the buffer cross-entropy term (DER++); ``0`` gives DER; ``>= 0``.
        buffer_size, policy, replay_batch_size, buffer_device, label_key, seed: as Replay.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.DER
              init_args: {buffer_size: 500, alpha: 0.3, beta: 0.5}
    """

    def __init__(
        self,
        buffer_size: int = 500,
        alpha: float = 0.3,
        beta: float = 0.5,
        policy: str = "reservoir",
        replay_batch_size: int | None = None,
        buffer_device: str | None = None,
        label_key: str = "label",
        seed: int | None = None,
    ) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0:  # NaN too
                raise ConfigError(f"DER.{name}: must be >= 0 (0 turns the term off), got {value}")
        super().__init__(buffer_size, policy, replay_batch_size, buffer_device, label_key, seed)
        self.alpha, self.beta = float(alpha), float(beta)
        self._term: str | None = None
        self._module: LightningModule | None = None

    # -- logits -----------------------------------------------------------------------------
    def _raw_logits(self, module: LightningModule, batch: Batch) -> Tensor:
        x, task = batch[module.input_key], batch.get("task")
        return module.head(module.features(x, task))

    def record_logits(self, module: LightningModule, batch: Batch) -> Tensor:
        """The module's raw logits on ``batch``, in eval mode and without gradient (how the
        buffer's logits are recorded)."""
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                device = module.device
                batch = {k: v.to(device) for k, v in batch.items()}
                return self._raw_logits(module, batch).float()
        finally:
            module.train(was_training)

    def update(
        self,
        data: ExperienceData | Batch,
        experience: int,
        rank: int = 0,
        world_size: int = 1,
        module: LightningModule | None = None,
    ) -> None:
        """Replay's update, the kept samples carrying ``module``'s logits on them."""
        module = module or self._module
        if module is None:
            raise ConfigError("DER.update: needs the module whose logits it records")
        data = _WithLogits(as_experience(data), lambda batch: self.record_logits(module, batch))
        super().update(data, experience, rank, world_size)

    # -- the loss term ----------------------------------------------------------------------
    def der_loss(self, batch: Batch, outputs: dict[str, Tensor]) -> Tensor:
        """``alpha * MSE + beta * CE`` on two draws of buffer samples (zero while empty)."""
        module = self._module
        zero = outputs["logits"].new_zeros(())
        if not len(self) or (self.alpha == 0 and self.beta == 0):
            return zero
        n = self.replay_batch_size or len(batch[self.label_key])
        rank, _ = rank_and_world_size(self._trainer)
        step = self._trainer.global_step if self._trainer is not None else 0
        loss = zero
        device = next(iter(self.buffer.values())).device
        if self.alpha > 0:
            draw = self._draw(self.sample(n, rank, step, 1).to(device), outputs["logits"].device)
            loss = loss + self.alpha * F.mse_loss(self._raw_logits(module, draw), draw[LOGITS_KEY])
        if self.beta > 0:
            draw = self._draw(self.sample(n, rank, step, 2).to(device), outputs["logits"].device)
            features = module.features(draw[module.input_key], draw.get("task"))
            logits = module.linear_logits(features, draw.get("task"))
            loss = loss + self.beta * F.cross_entropy(logits, draw[self.label_key])
        return loss

    def _draw(self, index: Tensor, device: torch.device) -> Batch:
        return {k: v.index_select(0, index).to(device) for k, v in self.buffer.items()}

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module
        require(pl_module, StrategyHost, "DER")
        self._term = pl_module.add_loss_term("der", self.der_loss)  # no batch transform

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        require(pl_module, FeatureClassifier, "DER")  # the module builds its parts in setup

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._term is not None:
            pl_module.remove_loss_term(self._term)
            self._term = None
        super().teardown(trainer, pl_module, stage)
        self._module = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            policy=self.policy, buffer_size=self.buffer_size, alpha=self.alpha, beta=self.beta
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha, "beta": self.beta}
