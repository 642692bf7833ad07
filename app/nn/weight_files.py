"""Backbone weight files, read through timm's checkpoint helpers; and checkpoints that hold
what trained, not the pretrained backbone it trained on.

A weights file (``encoder_weights``, a tower's ``weights``) is read by timm's
``load_state_dict`` (``torch.load(weights_only=True)``: tensors only, no code; a
``.safetensors`` file through safetensors), unwrapped from the usual containers and cleaned
of DDP/compile prefixes by timm's ``clean_state_dict``. Mneme records its source and SHA-256
(``weights_source``) next to it.

A backbone frozen as its weights file or hub tag made it (``weights_source``, set by
:func:`mneme.app.nn.backbones.create_backbone` and the text towers) is the same tensors on every
load, so a checkpoint leaves out what :meth:`BackboneAdaptation.unchanged_tensors` names and
records the source it came from. A load rebuilds the module from its hyperparameters (which
name the same file or tag), checks the source by digest, and fills the left-out tensors
back in before Lightning's strict ``load_state_dict``. A LoRA update folded into the weights
(``merge_each_experience``) changes the backbone: from then on it is saved whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError
from mneme.app.core.package_files import resolve_path
from mneme.app.finetuning.adaptation import BackboneAdaptation
from torch import Tensor, nn

KEY = "mneme_backbone"
# Wrappers that training scripts put around a state dict (timm unwraps the first two).
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def read_state_dict(path: Path, field: str) -> dict[str, Tensor]:
    """Tensors by name from a weights file (timm's ``load_state_dict``: ``weights_only``, so a
    file holding code is refused; ``.safetensors`` read by safetensors), unwrapped from the
    usual ``{"state_dict": ...}`` containers, DDP/compile prefixes removed."""
    from timm.models import clean_state_dict, load_state_dict

    try:
        state: Any = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle refusing code, a truncated or foreign file
        text = str(err).strip().splitlines()
        reason = text[0][:200] if text else type(err).__name__
        raise ConfigError(f"{field}: '{path}' is not a tensor checkpoint ({reason})") from None
    while isinstance(state, dict) and len(state) == 1 and next(iter(state)) in STATE_DICT_KEYS:
        state = next(iter(state.values()))
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{field}: '{path}' holds no state dict of tensors")
    return clean_state_dict(state)


def resolve_weights_path(value: str, field: str) -> Path:
    """The file ``value`` names: a path, or ``package:<package>/<path inside it>``."""
    return resolve_path(value, field, "file")


def match_state(
    own: dict[str, Tensor],
    state: dict[str, Tensor],
    keys: str,
    field: str,
    hint: str = "use a file made for this architecture",
) -> dict[str, Tensor]:
    """``state`` under the names of ``own``, checked complete and of the same shapes: matched
    by name (``exact``), or in order for a file written with another library's names
    (``by_position``: every tensor's shape must match in order)."""
    if keys == "by_position":
        theirs = list(state.values())
        if state_shapes(state) != state_shapes(own):
            raise ConfigError(f"{field}: {_position_mismatch(own, state)}")
        state = dict(zip(own, theirs, strict=True))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ConfigError(
            f"{field}: the file does not fit the model: missing keys {_first(missing)}, "
            f"unexpected keys {_first(unexpected)}; {hint}"
        )
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"{field}: '{k}' has shape {tuple(state[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the model; use a file made for this architecture"
        )
    return state


def _first(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _position_mismatch(own: dict[str, Tensor], state: dict[str, Tensor]) -> str:
    if len(own) != len(state):
        return (
            f"by_position needs as many tensors as the model has ({len(own)}), the file has "
            f"{len(state)}; use a file made for this architecture"
        )
    for (mine, a), (theirs, b) in zip(own.items(), state.items(), strict=True):
        if a.shape != b.shape:
            return (
                f"by_position: tensor '{theirs}' {tuple(b.shape)} of the file meets '{mine}' "
                f"{tuple(a.shape)} of the model; use a file made for this architecture"
            )
    return "by_position: no mismatch"  # unreachable when called on a mismatch


def state_shapes(state: dict[str, Tensor]) -> list[tuple[int, ...]]:
    """The shapes of a state dict's tensors, in order."""
    return [tuple(t.shape) for t in state.values()]


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
