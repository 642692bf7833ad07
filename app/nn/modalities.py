"""One encoder per modality, each projected into a shared, L2-normalized embedding space.

Encoders are named in config by ``type`` (a key of :data:`ENCODER_TYPES`) and ``model`` (a timm
model name or an open_clip model config name); the modality's default type is used when
``type`` is left out. Builders come from the ecosystem: timm's ``create_model`` (through
:func:`mneme.app.nn.encoders.create_encoder`) for images and spectrograms, open_clip's
``create_model``/``get_tokenizer`` for the CLIP towers and the BPE tokenizer bundled with
open_clip. Nothing downloads unless a hub tag is named (``pretrained: openai``); local
weights load from a file (``weights: path``).

Example (YAML)::

    model:
      class_path: mneme.app.ContrastiveAligner
      init_args:
        embed_dim: 64
        encoders:
          image: {model: mneme_mlp, args: {hidden: [256]}}          # type: timm (default)
          text: {model: mneme-tiny-clip}                            # type: open_clip_text
          audio: {model: mneme_cnn, n_mels: 40}                     # type: log_mel
          # image: {type: open_clip_visual, model: ViT-B-32, weights: ckpt/clip.pt,
          #         projection: none}   # keep a pretrained CLIP space as it is
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from mneme.app.core.errors import ConfigError
from mneme.app.finetuning.adaptation import BackboneAdaptation, freeze_norm_statistics
from mneme.app.nn.backbones import create_backbone
from mneme.app.nn.encoders import create_encoder, feature_dim
from torch import Tensor, nn

# Tiny open_clip configs for tests and CPU configs (``mneme-tiny-clip``: 2-layer width-64
# towers, context 16), registered into open_clip's own config registry so they are named
# exactly like ``ViT-B-32``.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
if "mneme-tiny-clip" not in open_clip.list_models():
    open_clip.add_model_config(MODEL_CONFIG_DIR)

DEFAULT_TYPES = {"image": "timm", "text": "open_clip_text", "audio": "log_mel"}
# Encoder types by name (``type:`` in a config): open, so a new modality is one new file.
ENCODER_TYPES: dict[str, Callable[..., nn.Module]] = {}
# Mneme's encoder types defined in modules of their own (heavy imports: transformers), by
# name -> the module whose import registers them: resolved when a config names them, so
# that a type never depends on which other module happened to be imported first.
BUILTIN_MODULES = {"hf_text": "mneme.app.nn.hf_text"}


def encoder_class(name: Any, field: str = "model.encoders") -> Callable[..., nn.Module]:
    """The class registered as encoder type ``name`` (importing the Mneme module that
    defines it, if it is one of :data:`BUILTIN_MODULES`)."""
    given, name = name, name if isinstance(name, str) else None
    if name not in ENCODER_TYPES and name in BUILTIN_MODULES:
        import importlib

        importlib.import_module(BUILTIN_MODULES[name])
    if name is None or name not in ENCODER_TYPES:
        known = sorted({*ENCODER_TYPES, *BUILTIN_MODULES})
        raise ConfigError(f"{field}.type: one of {known}, got {given!r}")
    return ENCODER_TYPES[name]


def encoder_type(name: str) -> Callable[[type], type]:
    """Register an encoder class under ``name``. The class takes ``input_shape`` (one
    sample's shape) first, then its config arguments, and sets ``out_dim``.

    Example::

        @encoder_type("my_sensor")
        class SensorEncoder(nn.Module):
            def __init__(self, input_shape, width: int = 64): ...
    """

    def register(cls: type) -> type:
        if name in ENCODER_TYPES and ENCODER_TYPES[name] is not cls:
            raise ValueError(f"encoder type '{name}' is registered already")
        ENCODER_TYPES[name] = cls
        return cls

    return register


# -- image: timm ------------------------------------------------------------------------------
@encoder_type("timm")
class TimmImage(nn.Module):
    """A timm model (no classifier) over ``(N, C, H, W)`` inputs, with pretrained weights
    (``pretrained``: a tag; ``weights``: a file, ``weights_keys``: ``exact`` or
    ``by_position``; ``input_size``) and ``freeze``/``peft`` as the classifier's encoder
    (:mod:`mneme.app.nn.backbones`, :mod:`mneme.app.finetuning.adaptation`)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        model: str = "mneme_mlp",
        args: dict[str, Any] | None = None,
        weights: str | None = None,
        weights_keys: str = "exact",
        pretrained: bool | str | None = None,
        input_size: Sequence[int] | None = None,
        freeze: bool | None = None,
        peft: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(input_shape)
        field = "model.encoders.image"
        self.backbone = create_backbone(
            model, shape, args, weights, weights_keys, pretrained, input_size, field, sep="."
        )
        self.adaptation = BackboneAdaptation(
            self.backbone, peft, freeze, input_shape=shape, field=f"{field}.peft"
        )
        freeze_norm_statistics(self.backbone)
        self.out_dim = feature_dim(self.backbone, shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x.float())


# -- open_clip towers -------------------------------------------------------------------------
def _open_clip(model: str, weights: str | None, pretrained: str | None, **kwargs: Any):
    """An open_clip model with its text tower as a module of its own (``force_custom_text``;
    open_clip converts standard CLIP checkpoints on load). ``weights`` is a local file,
    ``pretrained`` a hub tag (downloads): at most one."""
    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            f"model.encoders.*.model: unknown open_clip config '{model}'; use one of "
            "open_clip.list_models() (e.g. mneme-tiny-clip, ViT-B-32)"
        )
    if weights and pretrained:
        raise ConfigError(
            "model.encoders.*: give 'weights' (a local file) or 'pretrained', not both"
        )
    if weights and not Path(weights).is_file():
        raise ConfigError(f"model.encoders.*.weights: no file at '{weights}'")
    random_init = _RandomInitNotice() if not (weights or pretrained) else None
    if random_init:  # the config asks for random weights: open_clip's warning says so again
        logging.getLogger().addFilter(random_init)
    try:
        return open_clip.create_model(
            model,
            pretrained=weights or pretrained,
            force_custom_text=True,
            pretrained_image=False,  # no implicit tower downloads: only what the user named
            pretrained_text=False,
            **kwargs,
        )
    finally:
        if random_init:
            logging.getLogger().removeFilter(random_init)


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "Model initialized randomly" warning, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@encoder_type("open_clip_visual")
class OpenClipVisual(nn.Module):
    """The visual tower of an open_clip model. Inputs in ``[0, 1]`` of any size and 1 or 3
    channels are resized to the tower's ``image_size``, gray is repeated to RGB, and
    (``normalize``) the model's mean/std applied, as its preprocessing would."""

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        model: str = "mneme-tiny-clip",
        weights: str | None = None,
        pretrained: str | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        clip = _open_clip(model, weights, pretrained)
        self.tower = clip.visual
        cfg = getattr(self.tower, "preprocess_cfg", {}) or {}
        size = self.tower.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.normalize = normalize
        mean = torch.tensor(cfg.get("mean", (0.0, 0.0, 0.0))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (1.0, 1.0, 1.0))).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.out_dim = int(self.tower.output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.tower(x)


@encoder_type("open_clip_text")
class OpenClipText(nn.Module):
    """The text tower of an open_clip model and open_clip's tokenizer for it (the BPE
    vocabulary bundled with open_clip). Token ids shorter than the context are zero-padded."""

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        model: str = "mneme-tiny-clip",
        weights: str | None = None,
        pretrained: str | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        extra = {"force_context_length": context_length} if context_length else {}
        clip = _open_clip(model, weights, pretrained, **extra)
        self.tower = clip.text
        self.context_length = int(self.tower.context_length)
        # A plain attribute, not a module: it holds no weights.
        self.tokenizer = open_clip.get_tokenizer(model, context_length=self.context_length)
        self.out_dim = int(self.tower.output_dim)
        if input_shape and input_shape[-1] > self.context_length:
            raise ConfigError(
                f"model.encoders.text.context_length: the stream's captions have "
                f"{input_shape[-1]} tokens, the text tower takes {self.context_length}; "
                "tokenize the stream with data.benchmark_args.context_length <= it"
            )

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``(len(texts), context_length)``."""
        return self.tokenizer(list(texts))

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = tokens.long()
        if tokens.shape[1] < self.context_length:
            tokens = F.pad(tokens, (0, self.context_length - tokens.shape[1]))
        return self.tower(tokens)


# -- audio: log-mel spectrogram + timm CNN ----------------------------------------------------
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
        self.n_fft, self.hop_length = n_fft, hop_length
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
    """Log-mel front end, then a timm model over the 1-channel spectrogram."""

    def __init__(
        self,
        input_shape: Sequence[int],
        model: str = "mneme_cnn",
        args: dict[str, Any] | None = None,
        weights: str | None = None,
        sample_rate: int = 8000,
        n_fft: int = 256,
        hop_length: int = 64,
        n_mels: int = 40,
        f_min: float = 0.0,
        f_max: float | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ConfigError(
                f"model.encoders.audio: expects waveforms (N, T), the stream gives samples of "
                f"shape {tuple(input_shape)}; give the audio field as 1-D PCM per sample"
            )
        self.frontend = LogMel(sample_rate, n_fft, hop_length, n_mels, f_min, f_max)
        shape = (1, n_mels, self.frontend.frames(int(input_shape[0])))
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


# -- the registry and the shared projection ---------------------------------------------------
PROJECTIONS = ("linear", "none")


class ModalityEncoder(nn.Module):
    """``backbone -> projection -> L2 normalization``: embeddings on the unit sphere of the
    shared ``D``-dimensional space."""

    def __init__(self, backbone: nn.Module, embed_dim: int, projection: str = "linear") -> None:
        super().__init__()
        self.backbone = backbone
        if projection == "none":
            self.projection = nn.Identity()
        else:
            self.projection = nn.Linear(backbone.out_dim, embed_dim, bias=False)
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.projection(self.backbone(x)), dim=-1)


def build_encoder(
    modality: str,
    spec: dict[str, Any],
    embed_dim: int,
    input_shape: Sequence[int] | None = None,
) -> ModalityEncoder:
    """Build the encoder of ``modality`` from its config ``spec``.

    ``spec`` keys: ``type`` (default by modality: image ``timm``, text ``open_clip_text``,
    audio ``log_mel``), ``projection`` (``linear`` or ``none``), and the arguments of the
    type's class (``model``, ``args``, ``weights``, ...). ``input_shape`` is one sample's
    shape in the stream.
    """
    field = f"model.encoders.{modality}"
    spec = dict(spec)
    kind = spec.pop("type", DEFAULT_TYPES.get(modality))
    cls = encoder_class(kind, field)
    projection = spec.pop("projection", "linear")
    if projection not in PROJECTIONS:
        raise ConfigError(f"{field}.projection: one of {PROJECTIONS}, got {projection!r}")
    try:
        inspect.signature(cls).bind(input_shape, **spec)
    except TypeError as err:
        raise ConfigError(f"{field}: {err} (for type '{kind}')") from None
    backbone = cls(input_shape, **spec)
    if projection == "none" and backbone.out_dim != embed_dim:
        raise ConfigError(
            f"{field}.projection: 'none' needs the encoder width ({backbone.out_dim}) to equal "
            f"model.embed_dim ({embed_dim}); set embed_dim or use projection: linear"
        )
    return ModalityEncoder(backbone, embed_dim, projection)


def build_encoders(
    specs: dict[str, dict[str, Any]],
    embed_dim: int,
    input_shapes: dict[str, Sequence[int] | None],
) -> nn.ModuleDict:
    """One :class:`ModalityEncoder` per modality of ``specs`` (keys are the batch keys)."""
    if embed_dim < 1 or not math.isfinite(embed_dim):
        raise ConfigError(f"model.embed_dim: must be a positive integer, got {embed_dim}")
    return nn.ModuleDict(
        {m: build_encoder(m, spec, embed_dim, input_shapes.get(m)) for m, spec in specs.items()}
    )
