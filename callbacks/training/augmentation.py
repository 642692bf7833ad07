"""Batch augmentation as strategies: MixUp/CutMix (timm's ``Mixup``), input noise and
SpecAugment's time/frequency masks of an audio encoder's log-mel input.

Each callback registers a batch transform (:meth:`ContinualModule.add_batch_transform`),
which runs in the order of ``trainer.callbacks``: put it **after** ``Replay`` and the
replayed rows are in the batch when it runs. ``apply_to: all`` (the default) augments them
as the current ones; ``apply_to: current`` leaves them as they are, reading the number of
current rows Replay records under ``batch["current_rows"]``
(:data:`mneme.callbacks.run_context.CURRENT_ROWS`, with Replay's ``mark_current_rows: true``,
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
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import Batch, SoftTargetClassifier, StrategyHost, require
from mneme.app.core.seeding import derive_seed, run_seed
from mneme.callbacks.base import ChangesTraining
from mneme.callbacks.run_context import CURRENT_ROWS
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import Tensor, nn

APPLY_TO = ("all", "current")
# The batch key of soft targets the classifier trains on (ContinualClassifier's SOFT_LABEL).
SOFT_LABEL = "soft_label"


def check_current_rows(trainer: Trainer, who: str) -> None:
    """``apply_to: current`` needs every Replay to mark the current rows."""
    for callback in trainer.callbacks:  # Replay's setting, read without importing strategies
        if getattr(callback, "mark_current_rows", None) is False:
            raise ConfigError(
                f"Replay.mark_current_rows: set it true for {who}.apply_to: current (or use "
                "apply_to: all), so the replayed rows can be told apart"
            )


def current_rows(batch: Batch) -> int:
    """How many leading rows of ``batch`` are the stream's (the rest replayed)."""
    n = len(batch["label"])
    return int(batch[CURRENT_ROWS]) if CURRENT_ROWS in batch else n


class _BatchAugmentation(ChangesTraining, Callback):
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


def mask_along_axis(
    spec: Tensor, axis: int, count: int, max_width: int, rows: int, generator: torch.Generator
) -> Tensor:
    """Zero-mean masking of ``count`` bands of up to ``max_width`` bins along ``axis`` of each
    of the first ``rows`` spectrograms ``(N, 1, n_mels, frames)``: the band width is uniform
    in ``[0, max_width]`` and its start uniform over the positions where it fits, as
    torchaudio's ``mask_along_axis_iid`` draws them (hand-written: torchaudio is not a
    dependency, and these are a few comparisons)."""
    size = spec.shape[axis]
    if rows == 0 or count == 0 or max_width == 0:
        return spec
    width = (torch.rand(rows, count, generator=generator) * (min(max_width, size) + 1)).floor()
    start = (torch.rand(rows, count, generator=generator) * (size - width + 1)).floor()
    idx = torch.arange(size).view(1, 1, size)
    band = (idx >= start.unsqueeze(-1)) & (idx < (start + width).unsqueeze(-1))
    masked = band.any(dim=1).to(spec.device)  # (rows, size): bins inside any of the bands
    shape = [rows, 1, 1, 1]
    shape[axis] = size
    keep = ~masked.view(shape)
    # The log-mel is standardized per clip, so 0 is each clip's mean: the mask value.
    head = spec[:rows] * keep.to(spec)
    return torch.cat([head, spec[rows:]])


class SpecAugmentMasks(nn.Module):
    """The masks SpecAugment puts at the log-mel encoder's ``feature_transform``: they act only
    in training mode and only once :meth:`arm` gave the step's seed; a module, not a bound
    method, so a teacher's ``copy.deepcopy`` copies three numbers and no callback."""

    def __init__(self, freq_masks: int, freq_width: int, time_masks: int, time_width: int):
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.seed: int | None = None
        self.rows = self.batch_rows = 0
        self.mask_other_batches = True
        self.calls = 0  # training-mode passes since armed (0 after a step: bypassed)

    def arm(self, seed: int, rows: int, batch_rows: int) -> None:
        self.seed, self.rows, self.batch_rows = seed, rows, batch_rows
        self.calls = 0

    def forward(self, spec: Tensor) -> Tensor:
        if not self.training or self.seed is None:
            return spec
        self.calls += 1
        # The training batch's rows as the batch transform saw them; another forward in the
        # step (a strategy's own draw) is masked whole with apply_to: all, else left alone.
        n = len(spec)
        rows = self.rows if n == self.batch_rows else (n if self.mask_other_batches else 0)
        g = torch.Generator().manual_seed(self.seed)
        spec = mask_along_axis(spec, 2, self.freq_masks, self.freq_width, rows, g)
        return mask_along_axis(spec, 3, self.time_masks, self.time_width, rows, g)


class SpecAugment(_BatchAugmentation):
    """SpecAugment's frequency and time masking (Park et al., 2019, without time warping) of
    the log-mel input of an audio encoder (``type: log_mel``): each training clip gets
    ``freq_masks`` bands of up to ``freq_width`` mel bins and ``time_masks`` bands of up to
    ``time_width`` frames set to its mean (0; the log-mel is standardized per clip).

    The log-mel is computed inside the encoder, so the masks sit at its extension point
    (``LogMelAudio.feature_transform``) and act in training mode only: validation, test and
    a teacher in eval mode see unmasked spectrograms. The batch transform arms them with the
    step's seed and the rows to mask; with ``apply_to: current`` replayed clips stay
    unmasked (Replay's ``mark_current_rows: true``).

    Args:
        freq_masks: frequency bands per clip.
        freq_width: the widest frequency band, in mel bins.
        time_masks: time bands per clip.
        time_width: the widest time band, in frames.
        apply_to: ``all`` (current and replayed clips) or ``current``.
        input_key: the batch key (and encoder) of the audio.
        seed: base seed; default the run's.

    Example (YAML; after Replay, so replayed clips are masked too)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.Replay
              init_args: {buffer_size: 200}
            - class_path: mneme.callbacks.SpecAugment
              init_args: {freq_masks: 2, freq_width: 6, time_masks: 2, time_width: 8}
    """

    name = "spec_augment"

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 6,
        time_masks: int = 2,
        time_width: int = 8,
        apply_to: str = "all",
        input_key: str = "audio",
        seed: int | None = None,
    ) -> None:
        for field, value in [
            ("freq_masks", freq_masks),
            ("freq_width", freq_width),
            ("time_masks", time_masks),
            ("time_width", time_width),
        ]:
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"SpecAugment.{field}: a whole number >= 0, got {value!r}")
        if freq_masks * freq_width == 0 and time_masks * time_width == 0:
            raise ConfigError(
                "SpecAugment.freq_masks: no frequency and no time mask would be drawn; give "
                "freq_masks and freq_width (or time_masks and time_width) > 0"
            )
        super().__init__(apply_to, input_key, seed)
        self.masks = SpecAugmentMasks(freq_masks, freq_width, time_masks, time_width)
        self.masks.mask_other_batches = apply_to == "all"
        self._hosts: list[nn.Module] = []
        self._verified = False  # the first training step went through the masks

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The aligner builds its encoders in its own setup, after ours.
        encoders = getattr(pl_module, "encoders", None)
        has = encoders is not None and self.input_key in encoders
        root = encoders[self.input_key] if has else None
        hosts = [
            m
            for m in (root.modules() if root is not None else ())
            if isinstance(getattr(m, "feature_transform", None), nn.Module)
        ]
        if not hosts:
            raise ConfigError(
                f"SpecAugment.input_key: {type(pl_module).__name__} has no log-mel encoder "
                f"under '{self.input_key}'; name the audio modality (model.encoders.<key>, "
                "type: log_mel)"
            )
        for host in hosts:
            host.feature_transform = self.masks
        self._hosts = hosts
        self._verified = False

    def augment(self, batch: Batch, batch_idx: int = 0) -> Batch:
        self.masks.arm(self.step_seed(batch_idx), self.rows(batch), len(batch[self.input_key]))
        return batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # A module that reads the log-mel front end itself, past LogMelAudio.forward, would
        # train unmasked without a word: after the first step, say so instead.
        if self._verified or not self._hosts or self.masks.seed is None:
            return
        if self.masks.calls == 0:
            raise ConfigError(
                f"SpecAugment.input_key: {type(pl_module).__name__}'s '{self.input_key}' "
                "encoder computed its log-mel without LogMelAudio.feature_transform, so no "
                "mask applied; use a module that calls the encoder (ContrastiveAligner) or "
                "drop SpecAugment"
            )
        self._verified = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for host in self._hosts:
            host.feature_transform = nn.Identity()
        self._hosts = []
        super().teardown(trainer, pl_module, stage)
