"""SpecAugment's time/frequency masks of an audio encoder's log-mel input, as a batch
augmentation (see :mod:`mneme.callbacks.training.batch_augmentation`)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import Batch
from mneme.callbacks.training.batch_augmentation import BatchAugmentation
from torch import Tensor, nn


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


class SpecAugment(BatchAugmentation):
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
