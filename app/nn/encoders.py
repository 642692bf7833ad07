"""Image encoders through one factory: timm's ``create_model``.

Two small models that suit 8x8 and 28x28 inputs are registered into timm's own registry,
so ``mneme_mlp``, ``mneme_cnn`` and every timm model (``resnet18``, ``vit_tiny_patch16_224``,
...) are named the same way in a config and built by the same call.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Sequence
from typing import Any

import timm
import torch
from mneme.app.core.errors import ConfigError
from mneme.app.nn.weight_files import match_state, read_state_dict, resolve_weights_path
from timm.models import register_model
from torch import Tensor, nn


class MLPEncoder(nn.Module):
    """Flatten, then ``Linear -> ReLU`` per hidden width (the MLP of the continual-learning
    literature: 784-400-400 on MNIST). ``num_features`` is the last width."""

    def __init__(
        self,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 28,
        hidden: Sequence[int] = (400, 400),
        dropout: float = 0.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        widths = [in_chans * math.prod(size), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.num_features = widths[-1]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """``[Conv3x3 -> BN -> ReLU -> MaxPool]`` per width, then global average pooling.
    Works from 8x8 up (two poolings by default)."""

    def __init__(
        self, in_chans: int = 1, widths: Sequence[int] = (32, 64), num_classes: int = 0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip([in_chans, *widths[:-1]], widths, strict=True):
            layers += [
                nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(fan_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = widths[-1]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _own_kwargs(pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop the arguments timm's factory passes to every entrypoint (pretrained_cfg, ...)."""
    if pretrained:
        raise ConfigError(
            "model.encoder: mneme models have no published weights; use encoder_weights"
        )
    return {k: v for k, v in kwargs.items() if not k.startswith("pretrained_") and k != "cache_dir"}


@register_model
def mneme_mlp(
    pretrained: bool = False, *, in_chans: int = 1, img_size: int | Sequence[int] = 28, **kwargs
) -> MLPEncoder:
    return MLPEncoder(in_chans=in_chans, img_size=img_size, **_own_kwargs(pretrained, kwargs))


@register_model
def mneme_cnn(pretrained: bool = False, *, in_chans: int = 1, **kwargs) -> SmallCNN:
    return SmallCNN(in_chans=in_chans, **_own_kwargs(pretrained, kwargs))


def create_encoder(
    name: str,
    input_shape: Sequence[int],
    weights: str | None = None,
    weights_field: str = "model.encoder_weights",
    **kwargs: Any,
) -> nn.Module:
    """Build a feature extractor (no classifier) by timm name for inputs of ``(C, H, W)``.

    ``weights`` is a local file of this model's own state dict, read with
    ``weights_only=True`` (timm's ``checkpoint_path`` would unpickle anything); nothing is
    downloaded. Pretrained weights of other shapes load through
    :func:`mneme.app.nn.backbones.create_backbone`. ``img_size`` is passed to entrypoints that
    declare it (the MLP needs it), so no model name is special-cased here.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(
            f"model.encoder: unknown model '{name}'"
            f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} "
            "(any name of timm.list_models(), or mneme_mlp / mneme_cnn)"
        )
    entrypoint = timm.models.model_entrypoint(name)
    if "img_size" in inspect.signature(entrypoint).parameters and len(input_shape) == 3:
        kwargs.setdefault("img_size", tuple(input_shape[1:]))
    model = timm.create_model(
        name, pretrained=False, num_classes=0, in_chans=input_shape[0], **kwargs
    )
    if weights:
        state = read_state_dict(resolve_weights_path(weights, weights_field), weights_field)
        model.load_state_dict(match_state(model.state_dict(), state, "exact", weights_field))
    return model


@torch.no_grad()
def feature_dim(encoder: nn.Module, input_shape: Sequence[int]) -> int:
    """The encoder's output width: ``num_features`` where timm sets it, else one probe pass."""
    if hasattr(encoder, "num_features"):
        return int(encoder.num_features)
    was_training = encoder.training
    out = encoder.eval()(torch.zeros(1, *input_shape))
    encoder.train(was_training)
    return out.shape[-1]
