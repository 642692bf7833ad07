"""Encoder type ``log_mel``: a log-mel spectrogram front end (hand-written: see
:class:`LogMel`) and a timm model over it; and the same tower for the few-shot modules'
audio fields (:func:`field_front_end`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.app.nn.encoder_registry import DEFAULT_TYPES, encoder_type
from mneme.app.nn.encoders import create_encoder, feature_dim
from torch import Tensor, nn


def _hz_to_mel(f: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Triangular HTK-mel filters ``(n_freqs, n_mels)``, unnormalized: the same matrix as
    ``torchaudio.functional.melscale_fbanks(..., norm=None, mel_scale="htk")``."""
    f_max = f_max or sample_rate / 2
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    mels = torch.linspace(
        _hz_to_mel(torch.tensor(f_min)), _hz_to_mel(torch.tensor(f_max)), n_mels + 2
    )
    points = _mel_to_hz(mels.double())
    widths = points[1:] - points[:-1]
    slopes = points.unsqueeze(0) - freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(down, up), min=0).float()


class LogMel(nn.Module):
    """Waveform ``(N, T)`` (int16 PCM or float) -> log-mel spectrogram ``(N, 1, n_mels,
    frames)``, standardized per clip (gain-invariant).

    Why hand-written: torchaudio is not a dependency, and no maintained library in the
    environment offers a torch mel front end; ``torch.stft`` plus a fixed filterbank matrix
    is all it takes, runs on any device and is differentiable."""

    def __init__(
        self,
        sample_rate: int = 8000,
        n_fft: int = 256,
        hop_length: int = 64,
        n_mels: int = 40,
        f_min: float = 0.0,
        f_max: float | None = None,
    ) -> None:
        super().__init__()
        self.n_fft, self.hop_length, self.n_mels = n_fft, hop_length, n_mels
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fbank = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max)
        self.register_buffer("fbank", fbank, persistent=False)

    def frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1  # torch.stft with center=True

    def forward(self, wave: Tensor) -> Tensor:
        if not wave.is_floating_point():
            wave = wave.float() / 32768.0  # int16 PCM
        spec = torch.stft(
            wave, self.n_fft, self.hop_length, window=self.window, return_complex=True
        )
        mel = torch.einsum("nft,fm->nmt", spec.abs().pow(2), self.fbank)
        logmel = torch.log(mel + 1e-6)
        mean = logmel.mean(dim=(1, 2), keepdim=True)
        std = logmel.std(dim=(1, 2), keepdim=True)
        return ((logmel - mean) / (std + 1e-5)).unsqueeze(1)


@encoder_type("log_mel")
class LogMelAudio(nn.Module):
    """Log-mel front end, then a timm model over the 1-channel spectrogram.

    ``front_end``: the :class:`LogMel` settings (``sample_rate``, ``n_fft``, ``hop_length``,
    ``n_mels``, ``f_min``, ``f_max``), passed through so they are listed once, in
    ``LogMel``'s signature (``build_encoder`` checks them against it: :attr:`forwards_to`).
    """

    forwards_to = LogMel  # where the keyword arguments of ``**front_end`` go

    def __init__(
        self,
        input_shape: Sequence[int],
        model: str = "mneme_cnn",
        args: dict[str, Any] | None = None,
        weights: str | None = None,
        **front_end: Any,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ConfigError(
                f"model.encoders.audio: expects waveforms (N, T), the stream gives samples of "
                f"shape {tuple(input_shape)}; give the audio field as 1-D PCM per sample"
            )
        self.frontend = LogMel(**front_end)
        shape = (1, self.frontend.n_mels, self.frontend.frames(int(input_shape[0])))
        self.backbone = create_encoder(model, shape, weights=weights, **(args or {}))
        self.out_dim = feature_dim(self.backbone, shape)
        # Extension point: a transform of the log-mel (N, 1, n_mels, frames) between the front
        # end and the backbone; identity unless a strategy sets it (mneme.callbacks.SpecAugment
        # puts its masks here, which act only in training mode). No parameters: checkpoints
        # are the same either way.
        self.feature_transform: nn.Module = nn.Identity()

    def forward(self, wave: Tensor) -> Tensor:
        return self.backbone(self.feature_transform(self.frontend(wave)))


def field_front_end(
    input_key: str | None,
    input_shape: Sequence[int],
    model: str,
    args: dict[str, Any] | None = None,
    weights: str | None = None,
    image_only: dict[str, Any] | None = None,
) -> nn.Module | None:
    """The encoder of a module that names one timm ``model`` (the few-shot modules), when
    its field ``input_key`` is a modality whose default encoder is not a plain timm model
    over the samples: ``audio`` goes through the log-mel front end (:class:`LogMelAudio`),
    as the aligner's audio tower does. ``None`` for image-like fields (the caller builds
    its timm backbone). ``image_only``: settings (``{field: value}``) that apply only to
    image backbones, refused when set for a waveform."""
    if DEFAULT_TYPES.get(input_key or "") != "log_mel":
        return None
    for name, value in (image_only or {}).items():
        if value not in (None, False):
            raise ConfigError(
                f"{name}: '{input_key}' samples go through the log-mel front end and a timm "
                "model over the spectrogram; an image setting does not apply: remove it"
            )
    if len(input_shape) != 1:
        raise ConfigError(
            f"model.input_key: '{input_key}' samples are read as waveforms (T,) through the "
            f"log-mel front end, the stream's are {tuple(input_shape)}; name another field"
        )
    return LogMelAudio(input_shape, model=model, args=args, weights=weights)
