"""Batch augmentation of the inputs as strategies: MixUp/CutMix (timm's ``Mixup``) and input
noise. What they share (the batch transform, ``apply_to``, the seeds) is
:mod:`mneme.callbacks.training.batch_augmentation`; SpecAugment's log-mel masks are
:mod:`mneme.callbacks.training.spec_augment`.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import SOFT_LABEL, Batch, SoftTargetClassifier, require
from mneme.callbacks.training.batch_augmentation import BatchAugmentation
from timm.data import Mixup
from timm.data.mixup import mixup_target


class MixUp(BatchAugmentation):
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


class InputNoise(BatchAugmentation):
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
