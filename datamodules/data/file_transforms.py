"""Image transforms named in YAML for file streams: torchvision v2 transforms or timm's.

A config names transforms as data, never as import paths (a shared config must not build
arbitrary classes): a list of ``{name: <a torchvision.transforms.v2 transform>, **its
arguments}``, composed in order, or ``{timm: {<timm.data.create_transform arguments>}}``
(``input_size`` comes from the stream, ``is_training`` from the view: the training view
augments, the evaluation view resizes and crops as timm evaluates).

Example (YAML)::

    train_transform:
      - {name: RandomResizedCrop, size: 32, scale: [0.8, 1.0], antialias: true}
      - {name: RandomHorizontalFlip}
    # or: train_transform: {timm: {auto_augment: rand-m9-mstd0.5, interpolation: bicubic}}
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TransformSpec:
    kind: str  # "torchvision" | "timm"
    transform: Any


def _v2_names() -> list[str]:
    from torchvision.transforms import v2

    return sorted(
        name
        for name in dir(v2)
        if not name.startswith("_")
        and inspect.isclass(getattr(v2, name))
        and issubclass(getattr(v2, name), v2.Transform)
    )


def _v2_transform(item: Any, field: str) -> Any:
    from mneme.app.core.errors import ConfigError
    from torchvision.transforms import v2

    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ConfigError(
            f"{field}: {item!r} is not a transform; write {{name: RandomCrop, size: 32}} "
            "(a torchvision.transforms.v2 class and its arguments)"
        )
    args = {k: v for k, v in item.items() if k != "name"}
    names = _v2_names()
    if item["name"] not in names:
        close = difflib.get_close_matches(item["name"], names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else " (see torchvision.transforms.v2)"
        raise ConfigError(
            f"{field}.name: '{item['name']}' is not a torchvision.transforms.v2 transform{hint}"
        )
    cls = getattr(v2, item["name"])
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{field}: {item['name']}({args}): {err}") from None


def build_transform(
    spec: Any, field: str, image_size: int, channels: int, train: bool = False
) -> TransformSpec | None:
    """The transform ``spec`` names (see the module docstring), or ``None`` for none; a
    misspelled name or argument is refused naming ``field`` (built once, up front, so a
    bad config fails before any worker starts)."""
    from mneme.app.core.errors import ConfigError

    if spec is None or spec == []:
        return None
    if isinstance(spec, dict) and set(spec) == {"timm"}:
        from timm.data import create_transform

        kwargs = dict(spec["timm"] or {})
        for fixed in ("input_size", "is_training"):
            if fixed in kwargs:
                raise ConfigError(
                    f"{field}.timm.{fixed}: set by the stream (image_size, channels; the "
                    "training view trains); remove it"
                )
        try:
            inspect.signature(create_transform).bind(input_size=1, is_training=train, **kwargs)
            transform = create_transform(
                input_size=(channels, image_size, image_size), is_training=train, **kwargs
            )
        except (TypeError, ValueError, AssertionError, KeyError) as err:
            raise ConfigError(f"{field}.timm: timm.data.create_transform: {err}") from None
        return TransformSpec("timm", transform)
    if not isinstance(spec, list):
        raise ConfigError(
            f"{field}: a list of torchvision v2 transforms ([{{name: RandomCrop, size: 32}}]) "
            f"or {{timm: {{...}}}}, got {spec!r}"
        )
    from torchvision.transforms import v2

    steps = [_v2_transform(item, f"{field}[{i}]") for i, item in enumerate(spec)]
    return TransformSpec("torchvision", v2.Compose(steps))
