"""Optimizer parameter groups of a fine-tuning recipe: layer-wise learning-rate decay.

The groups come from timm's own :func:`timm.optim.param_groups_layer_decay` (BEiT's recipe):
the layers of a timm model are its ``group_matcher(coarse=False)`` groups (stem, each block,
...), the top one trains at the full learning rate and each layer below at ``layer_decay``
times the one above. 1-D parameters (biases, norm weights) and the model's
``no_weight_decay()`` names (a ViT's ``pos_embed``, ``cls_token``) get no weight decay.

In Mneme the classifier head is not inside the timm model (the encoder is built with
``num_classes=0``), so the head is handed over separately and placed where timm places a
classifier: in the top layer, at scale 1, with whatever the model leaves unmatched (a
ConvNeXt's ``head.norm``). Every layer of the encoder then gets the scale timm gives it in
the same model with its classifier inside: for a ResNet with a stem and four blocks, the
last block trains at ``lr * decay``, the stem at ``lr * decay**5``.

The learning rate itself is usually unknown here: the module receives an
``OptimizerCallable`` with ``lr`` bound inside it (``model.optimizer`` in YAML). So the
groups carry timm's ``lr_scale``, which plain torch optimizers keep but ignore, and
:func:`apply_lr_scale` turns it into each group's ``lr`` once the optimizer exists::

    optimizer = self.optimizer_factory(layer_decay_param_groups(encoder, head, layer_decay=0.75))
    apply_lr_scale(optimizer)  # before any LR scheduler is built on it
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from mneme.app.core.errors import ConfigError
from torch import nn
from torch.optim import Optimizer

# The names the head's parameters get in the view timm groups: no group_matcher regex (each
# is matched at the start of an encoder-relative name) matches them, so the head lands in
# timm's "unmatched" group, the top layer, as a classifier inside the model would.
HEAD_PREFIX = "<head>."


class _EncoderAndHead:
    """The encoder's parameters under their own names plus the head's, and the encoder's
    ``group_matcher``: what ``param_groups_layer_decay`` reads of a model."""

    def __init__(self, encoder: nn.Module, head: nn.Module | None) -> None:
        self.encoder, self.head = encoder, head

    def group_matcher(self, coarse: bool = False) -> Any:
        return self.encoder.group_matcher(coarse=coarse)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        seen: set[int] = set()
        parts = [("", self.encoder)]
        if self.head is not None:
            parts.append((HEAD_PREFIX, self.head))
        for prefix, module in parts:
            for name, param in module.named_parameters():
                if id(param) not in seen:  # a parameter shared by both is listed once
                    seen.add(id(param))
                    yield prefix + name, param


def layer_decay_param_groups(
    encoder: nn.Module,
    head: nn.Module | None = None,
    *,
    layer_decay: float = 0.75,
    weight_decay: float | None = None,
    no_weight_decay: Collection[str] = (),
    lr: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups with per-layer learning rates over the trainable parameters of
    ``encoder`` (a timm model) and ``head``.

    Args:
        encoder: a timm model with ``group_matcher`` (any module when ``layer_decay`` is 1).
        head: the classifier outside the encoder; trains at the full learning rate.
        layer_decay: learning-rate factor from one layer to the one below, in ``(0, 1]``.
        weight_decay: the weight decay of the decayed parameters; ``None`` leaves it to the
            optimizer's own ``weight_decay`` (``model.optimizer.init_args`` in YAML).
        no_weight_decay: more parameter names (fnmatch patterns, encoder-relative) without
            weight decay, beyond 1-D parameters and the encoder's ``no_weight_decay()``.
        lr: the base learning rate, to write each group's ``lr`` directly (for an optimizer
            built by hand); ``None`` leaves ``lr_scale`` in each group for
            :func:`apply_lr_scale`.

    Returns:
        A list of ``{"params", "lr_scale" | "lr", ["weight_decay"]}`` dicts; every trainable
        parameter appears in exactly one, frozen ones in none.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if not 0 < layer_decay <= 1:
        raise ConfigError(f"layer_decay: must lie in (0, 1], got {layer_decay}")
    model = _EncoderAndHead(encoder, head)
    names = set(no_weight_decay)
    if callable(getattr(encoder, "no_weight_decay", None)):
        names |= set(encoder.no_weight_decay())
    has_matcher = callable(getattr(encoder, "group_matcher", None))
    if not has_matcher and layer_decay != 1:
        raise ConfigError(
            f"model.encoder: layer_decay needs a timm model with group_matcher() (its layers); "
            f"{type(encoder).__name__} has none; use a timm model (resnet18, "
            "vit_tiny_patch16_224, ...) or layer_decay: 1.0"
        )
    # weight_decay=-1 marks the decayed groups, replaced below (None: the optimizer's own).
    if has_matcher:
        groups = param_groups_layer_decay(
            model, weight_decay=-1.0, no_weight_decay_list=names, layer_decay=layer_decay
        )
    else:  # layer_decay 1: weight-decay groups only, any encoder
        groups = param_groups_weight_decay(model, -1.0, no_weight_decay_list=names)
        for group in groups:
            group["lr_scale"] = 1.0
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    for group in groups:
        if group["weight_decay"] == -1.0:
            if weight_decay is None:
                del group["weight_decay"]
            else:
                group["weight_decay"] = weight_decay
        if any(id(p) in head_ids for p in group["params"]) and group["lr_scale"] != 1.0:
            raise ConfigError(
                f"model.encoder: {type(encoder).__name__}'s group_matcher claims the head's "
                "parameters; use layer_decay: 1.0 with this encoder"
            )
        if lr is not None:
            group["lr"] = lr * group.pop("lr_scale")
    return groups


def apply_lr_scale(optimizer: Optimizer) -> Optimizer:
    """Multiply each group's ``lr`` (and ``initial_lr``, which an LR scheduler built before
    reads as its base) by the group's ``lr_scale``, and drop the key.

    Torch optimizers keep a group's extra keys but ignore them; timm's schedulers read
    ``lr_scale`` at every step. Dropping it once applied makes this idempotent and keeps a
    timm scheduler from scaling a second time; the factor stays readable as
    ``applied_lr_scale``. Groups without ``lr_scale`` are left alone. Returns ``optimizer``.
    """
    for group in optimizer.param_groups:
        scale = group.pop("lr_scale", None)
        if scale is None:
            continue
        group["lr"] = group["lr"] * scale
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * scale
        group["applied_lr_scale"] = scale
    return optimizer
