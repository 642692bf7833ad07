"""Batch augmentation as strategies: MixUp/CutMix (timm's ``Mixup``) and input noise.

Each callback registers a batch transform (:meth:`ContinualModule.add_batch_transform`),
which runs in the order of ``trainer.callbacks``: put it **after** ``Replay`` and the
replayed rows are in the batch when it runs. ``apply_to: all`` (the default) augments them
as the current ones; ``apply_to: current`` leaves them as they are, reading the number of
current rows Replay records under ``batch["current_rows"]``
(:data:`mneme.callbacks.replay.CURRENT_ROWS`, with Replay's ``mark_current_rows: true``,
which ``apply_to: current`` asks for).

Randomness is stateless, as Replay's: a step's draw comes from ``(seed, rank, global_step,
batch_idx)``, so a resumed run augments exactly as an uninterrupted one and there is no RNG
state to checkpoint.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from mneme.app.protocols import Batch, SoftTargetClassifier, StrategyHost, require
from mneme.callbacks.replay import CURRENT_ROWS, derive_seed
from mneme.datamodules.errors import ConfigError
from mneme.datamodules.seeding import run_seed
from timm.data import Mixup
from timm.data.mixup import mixup_target

APPLY_TO = ("all", "current")
# The batch key of soft targets the classifier trains on (ContinualClassifier's SOFT_LABEL).
SOFT_LABEL = "soft_label"


def check_current_rows(trainer: Trainer, who: str) -> None:
    """``apply_to: current`` needs every Replay to mark the current rows."""
    from mneme.callbacks.replay import Replay

    for callback in trainer.callbacks:
        if isinstance(callback, Replay) and not callback.mark_current_rows:
            raise ConfigError(
                f"Replay.mark_current_rows: set it true for {who}.apply_to: current (or use "
                "apply_to: all), so the replayed rows can be told apart"
            )


def current_rows(batch: Batch) -> int:
    """How many leading rows of ``batch`` are the stream's (the rest replayed)."""
    n = len(batch["label"])
    return int(batch[CURRENT_ROWS]) if CURRENT_ROWS in batch else n


class _BatchAugmentation(Callback):
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


class MixUp(_BatchAugmentation):
    """MixUp and/or CutMix of training batches through timm's :class:`timm.data.Mixup`,
    with soft targets (label smoothing optional) under ``batch["soft_label"]``, which
    :class:`~mneme.app.ContinualClassifier` trains on instead of ``label`` (classes masked
    as unseen get no target mass). With ``apply_to: current`` the replayed rows keep their
    inputs and get the (smoothed) one-hot targets of their labels.

    timm mixes a batch with its reverse and needs an even number of rows: an odd last row is
    left unmixed (one-hot target).

    Args:
        mixup_alpha: Beta(alpha, alpha) of MixUp's mixing ratio; 0 turns MixUp off.
        cutmix_alpha: Beta of CutMix's box area; 0 turns CutMix off (both > 0: each batch
            picks one, CutMix with ``switch_prob``).
        prob: probability a batch is mixed at all.
        switch_prob: probability of CutMix when both are on.
        label_smoothing: timm's smoothing of the targets.
        apply_to: ``all`` (current and replayed rows) or ``current``.
        input_key: the batch key of the images.
        seed: base seed; default the run's.

    Example (YAML; after Replay, so replayed rows are mixed too)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.Replay
              init_args: {buffer_size: 500}
            - class_path: mneme.callbacks.MixUp
              init_args: {mixup_alpha: 0.2, label_smoothing: 0.1, apply_to: all}
    """

    name = "mixup"

    def __init__(
        self,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        apply_to: str = "all",
        input_key: str = "image",
        seed: int | None = None,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
            raise ConfigError(
                f"MixUp.mixup_alpha: mixup_alpha ({mixup_alpha}) or cutmix_alpha "
                f"({cutmix_alpha}) must be > 0 and neither negative (e.g. mixup_alpha: 0.2)"
            )
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"MixUp.label_smoothing: in [0, 1), got {label_smoothing}")
        if not 0 <= prob <= 1:
            raise ConfigError(f"MixUp.prob: in [0, 1], got {prob}")
        super().__init__(apply_to, input_key, seed)
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes: int | None = None
        self._mixup: Mixup | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The module builds its head (and knows num_classes) in its own setup, after ours.
        require(pl_module, SoftTargetClassifier, "MixUp")
        self.build(pl_module.num_classes)

    def build(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._mixup = Mixup(
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            prob=self.prob,
            switch_prob=self.switch_prob,
            label_smoothing=self.label_smoothing,
            num_classes=num_classes,
        )

    def augment(self, batch: Batch, batch_idx: int = 0) -> Batch:
        x, label = batch[self.input_key], batch["label"]
        soft = mixup_target(label, self.num_classes, 1.0, self.label_smoothing)
        n = self.rows(batch) // 2 * 2
        if n == 0:
            return {**batch, SOFT_LABEL: soft}
        # timm draws from numpy's and torch's global generators: draw under this step's seed
        # and give the global states back.
        seed = self.step_seed(batch_idx)
        np_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            mixed_x, mixed_soft = self._mixup(x[:n].clone(), label[:n])
        np.random.set_state(np_state)
        x = torch.cat([mixed_x, x[n:]])
        soft = torch.cat([mixed_soft.to(soft), soft[n:]])
        return {**batch, self.input_key: x, SOFT_LABEL: soft}


class InputNoise(_BatchAugmentation):
    """Input noise on training batches: additive Gaussian (``gaussian``: ``x + std * N(0,1)``)
    or dropout-style (``dropout``: each input element zeroed with probability ``p`` and the
    rest scaled by ``1/(1-p)``, ``torch.nn.functional.dropout``).

    Args:
        kind: ``gaussian`` or ``dropout``.
        std: the Gaussian's standard deviation (in the batch's units).
        p: the dropout probability.
        apply_to: ``all`` (current and replayed rows) or ``current``.
        input_key: the batch key of the inputs.
        seed: base seed; default the run's.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.InputNoise
              init_args: {kind: gaussian, std: 0.1, apply_to: current}
    """

    name = "input_noise"
    KINDS = ("gaussian", "dropout")

    def __init__(
        self,
        kind: str = "gaussian",
        std: float = 0.1,
        p: float = 0.1,
        apply_to: str = "all",
        input_key: str = "image",
        seed: int | None = None,
    ) -> None:
        if kind not in self.KINDS:
            raise ConfigError(f"InputNoise.kind: one of {list(self.KINDS)}, got '{kind}'")
        if std < 0:
            raise ConfigError(f"InputNoise.std: must be >= 0, got {std}")
        if not 0 <= p < 1:
            raise ConfigError(f"InputNoise.p: in [0, 1), got {p}")
        super().__init__(apply_to, input_key, seed)
        self.kind, self.std, self.p = kind, std, p

    def augment(self, batch: Batch, batch_idx: int = 0) -> Batch:
        x = batch[self.input_key]
        n = self.rows(batch)
        g = torch.Generator().manual_seed(self.step_seed(batch_idx))
        head = x[:n]
        if self.kind == "gaussian":
            noise = torch.randn(head.shape, generator=g, dtype=torch.float32)
            head = head + self.std * noise.to(head)
        else:
            keep = torch.rand(head.shape, generator=g) >= self.p
            head = head * keep.to(head) / (1 - self.p)
        return {**batch, self.input_key: torch.cat([head, x[n:]])}
