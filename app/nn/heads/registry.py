"""The heads a config names, in one registry, as timm's ``create_model`` names models::

    head: {name: ranpac, projection_dim: 2000}     # model.head of a classifier or a fusion

Every head is a :class:`HeadType`: its ``name``, what it is (``role``) and the spec keys it
takes (its class's declared ``spec_keys``, checked before the class is called):

- ``linear`` (the default): a ``Linear`` layer trained by cross-entropy;
- ``ncm``, ``simplecil``, ``ranpac``: prototype heads that predict from class statistics of
  the features, next to the linear layer whose cross-entropy still trains the backbone
  (:mod:`mneme.app.nn.heads.prototypes`);
- ``moe``: top-k routed expert MLPs in place of the linear layer
  (:mod:`mneme.app.nn.heads.moe`).

:func:`create_head` builds what a spec names: the head that gives the trained logits, and
the prototype head (``None`` unless one is named).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from mneme.app.core.errors import ConfigError
from mneme.app.nn.heads.moe import MoEHead
from mneme.app.nn.heads.prototypes import NCMHead, PrototypeHead, RanPACHead, SimpleCILHead
from torch import nn

FIELD = "model.head"
LINEAR = "linear"
Role = Literal["linear", "prototype", "routed"]


@dataclass(frozen=True)
class HeadType:
    """One head a config may name: its class (``None``: the plain ``Linear``), what it is,
    and the spec keys it takes."""

    name: str
    cls: type[nn.Module] | None
    role: Role
    spec_keys: tuple[str, ...]


def _entry(name: str, cls: type[nn.Module] | None, role: Role) -> HeadType:
    return HeadType(name, cls, role, tuple(getattr(cls, "spec_keys", ())))


HEADS: dict[str, HeadType] = {
    LINEAR: _entry(LINEAR, None, "linear"),
    "ncm": _entry("ncm", NCMHead, "prototype"),
    "simplecil": _entry("simplecil", SimpleCILHead, "prototype"),
    "ranpac": _entry("ranpac", RanPACHead, "prototype"),
    "moe": _entry("moe", MoEHead, "routed"),
}


def head_type(
    spec: dict[str, Any] | None, field: str = FIELD, roles: tuple[Role, ...] | None = None
) -> tuple[HeadType, dict[str, Any]]:
    """The registered head ``spec`` names (``None``: linear) and its arguments, checked
    against the head's declared parameters (and, with ``roles``, against what the model
    takes)."""
    spec = dict(spec or {})
    name = spec.pop("name", LINEAR)
    allowed = [n for n, t in HEADS.items() if roles is None or t.role in roles]
    if name not in allowed:
        close = difflib.get_close_matches(str(name), allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{field}.name: unknown head {name!r}{hint}; one of {', '.join(allowed)}")
    kind = HEADS[name]
    unknown = sorted(set(spec) - set(kind.spec_keys))
    if unknown:
        if not kind.spec_keys:
            raise ConfigError(f"{field}: the {name} head takes no arguments, got {unknown}")
        raise ConfigError(
            f"{field}: {name} takes {', '.join(kind.spec_keys)}, not {', '.join(unknown)}"
        )
    return kind, spec


def create_head(
    spec: dict[str, Any] | None,
    in_dim: int,
    out_dim: int,
    field: str = FIELD,
    roles: tuple[Role, ...] | None = None,
) -> tuple[nn.Module, PrototypeHead | None]:
    """``(head, prototype_head)`` of ``spec``: the module that gives the trained logits
    (``Linear`` or ``MoEHead``) ``in_dim -> out_dim``, and the prototype head over the same
    ``out_dim`` slots (``None`` unless ``spec`` names one)."""
    kind, arguments = head_type(spec, field, roles)
    if kind.role == "routed":
        return MoEHead(in_dim, out_dim, **arguments, field=field), None
    linear = nn.Linear(in_dim, out_dim)
    if kind.role == "prototype":
        return linear, _prototype_class(kind)(out_dim, in_dim, **arguments)
    return linear, None


def _prototype_class(kind: HeadType) -> type[PrototypeHead]:
    if kind.cls is None or not issubclass(kind.cls, PrototypeHead):
        raise TypeError(f"head {kind.name!r} is not a prototype head")
    return kind.cls


def build_head(
    spec: dict[str, Any] | None, num_classes: int, feature_dim: int, field: str = FIELD
) -> PrototypeHead | None:
    """The prototype head ``spec`` names (``None`` for ``linear``)."""
    kind, arguments = head_type(spec, field, roles=("linear", "prototype"))
    if kind.role == "linear":
        return None
    return _prototype_class(kind)(num_classes, feature_dim, **arguments)


def build_moe_head(spec: dict[str, Any], in_dim: int, out_dim: int, field: str = FIELD) -> MoEHead:
    """The :class:`MoEHead` a ``{name: moe, ...}`` spec names, its keys checked."""
    _, arguments = head_type(spec, field, roles=("routed",))
    return MoEHead(in_dim, out_dim, **arguments, field=field)
