"""One encoder per modality, each projected into a shared, L2-normalized embedding space.

Encoders are named in config by ``type`` (a key of
:data:`mneme.app.nn.encoder_registry.ENCODER_TYPES`) and ``model`` (a timm
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
import math
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from mneme.app.core.errors import ConfigError

# The built-in types, registered on import (encoder_class would also import each on demand).
from mneme.app.nn import log_mel, open_clip_towers, timm_image  # noqa: F401
from mneme.app.nn.encoder_registry import DEFAULT_TYPES, encoder_class
from torch import Tensor, nn

# -- the shared projection ---------------------------------------------------
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


def bind_encoder_args(cls: Any, input_shape: Sequence[int] | None, spec: dict[str, Any]) -> None:
    """Raise the ``TypeError`` that ``cls(input_shape, **spec)`` would raise for arguments
    it does not take, without building it: ``cls``'s signature, and the keyword arguments it
    passes through (``**kwargs``) against the signature of its ``forwards_to``, if any."""
    signature = inspect.signature(cls)
    bound = signature.bind(input_shape, **spec)
    target = getattr(cls, "forwards_to", None)
    if target is None:
        return
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inspect.signature(target).bind(**value)


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
        bind_encoder_args(cls, input_shape, spec)
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
