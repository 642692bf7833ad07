"""Encoder type ``timm``: a timm image model as a modality's backbone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mneme.app.finetuning.adaptation import BackboneAdaptation, freeze_norm_statistics
from mneme.app.nn.backbones import create_backbone
from mneme.app.nn.encoder_registry import encoder_type
from mneme.app.nn.encoders import feature_dim
from torch import Tensor, nn


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
