"""Checkpoints that hold what trained, not the pretrained backbone it trained on.

A backbone frozen as its weights file or hub tag made it (``weights_source``, set by
:func:`mneme.app.nn.backbones.create_backbone` and the text towers) is the same tensors on every
load, so a checkpoint leaves out what :meth:`BackboneAdaptation.unchanged_tensors` names and
records the source it came from. A load rebuilds the module from its hyperparameters (which
name the same file or tag), checks the source by digest, and fills the left-out tensors
back in before Lightning's strict ``load_state_dict``. A LoRA update folded into the weights
(``merge_each_experience``) changes the backbone: from then on it is saved whole.
"""

from __future__ import annotations

from typing import Any

from mneme.app.core.errors import ConfigError
from mneme.app.finetuning.adaptation import BackboneAdaptation
from torch import nn

KEY = "mneme_backbone"


def pretrained_backbones(module: nn.Module) -> dict[str, tuple[nn.Module, BackboneAdaptation]]:
    """Module name -> (backbone, its adaptation) for every backbone built from weights."""
    found = {}
    for name, backbone in module.named_modules():
        adaptation = getattr(backbone, "adaptation", None)
        if getattr(backbone, "weights_source", None) and isinstance(adaptation, BackboneAdaptation):
            found[name] = (backbone, adaptation)
    return found


def leave_out_unchanged(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Drop every pretrained backbone's unchanged tensors from ``checkpoint["state_dict"]``."""
    state, record = checkpoint["state_dict"], {}
    for name, (backbone, adaptation) in pretrained_backbones(module).items():
        keys = [f"{name}.{n}" if name else n for n in adaptation.unchanged_tensors()]
        omitted = [k for k in keys if k in state]
        for key in omitted:
            del state[key]
        record[name] = {"source": dict(backbone.weights_source), "omitted": omitted}
    if record:
        checkpoint[KEY] = record


def refill_unchanged(module: nn.Module, checkpoint: dict[str, Any], field: str) -> None:
    """Put the left-out tensors back, from ``module``'s own backbones, which must come from
    the sources the checkpoint was trained with."""
    own = None
    for name, entry in (checkpoint.get(KEY) or {}).items():
        try:
            backbone = module.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"{field}: the checkpoint's backbone '{name}' is not in this model; use the "
                "config the checkpoint was trained with"
            ) from None
        theirs, ours = entry["source"], getattr(backbone, "weights_source", None) or {}
        if _identity(theirs) != _identity(ours):
            raise ConfigError(
                f"{field}: the checkpoint holds only the trained part of a backbone from "
                f"{theirs.get('weights') or theirs.get('pretrained')} (sha256 "
                f"{theirs.get('sha256', '-')[:12]}); this model's comes from "
                f"{ours.get('weights') or ours.get('pretrained') or 'random weights'}: give "
                "the weights file (or tag) the run was trained with"
            )
        own = own if own is not None else module.state_dict()
        checkpoint["state_dict"].update({k: own[k] for k in entry["omitted"]})


def _identity(source: dict[str, str]) -> str | None:
    """What makes two sources the same weights: a file's digest, else the hub tag."""
    return source.get("sha256") or source.get("pretrained")
