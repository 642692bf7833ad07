"""Encoder types ``open_clip_visual`` and ``open_clip_text``: the towers of an open_clip
model (open_clip's ``create_model``/``get_tokenizer``; the BPE tokenizer bundled with
open_clip). Nothing downloads unless a hub tag is named (``pretrained: openai``); local
weights load from a file (``weights: path``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from mneme.app.core.errors import ConfigError
from mneme.app.nn.encoder_registry import encoder_type
from torch import Tensor, nn

# Tiny open_clip configs for tests and CPU configs (``mneme-tiny-clip``: 2-layer width-64
# towers, context 16), registered into open_clip's own config registry so they are named
# exactly like ``ViT-B-32``.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
if "mneme-tiny-clip" not in open_clip.list_models():
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def create_open_clip(model: str, weights: str | None, pretrained: str | None, **kwargs: Any):
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
    random_init = RandomInitNotice() if not (weights or pretrained) else None
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


class RandomInitNotice(logging.Filter):
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
        clip = create_open_clip(model, weights, pretrained)
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
        clip = create_open_clip(model, weights, pretrained, **extra)
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
