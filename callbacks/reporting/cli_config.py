"""The run's configuration as LightningCLI parsed it, for the logged run configuration.

A run started by the ``mneme`` command has LightningCLI's ``SaveConfigCallback`` among its
callbacks, holding the parsed configuration (every argument, defaults filled in): a
callback's arguments are read from there, not rebuilt from its attributes. A run built in
Python (no CLI) has no such record; the caller falls back to the callback's attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, Trainer


def cli_callback_arguments(trainer: Trainer) -> Callable[[Callback], dict[str, Any] | None]:
    """A lookup of each live callback's ``init_args`` in the parsed ``trainer.callbacks``
    (matched by class name, in order); ``None`` for a callback the config does not list
    (or a run without the CLI)."""
    from lightning.pytorch.cli import SaveConfigCallback

    callbacks: list[Callback] = getattr(trainer, "callbacks", [])
    saver = next((c for c in callbacks if isinstance(c, SaveConfigCallback)), None)
    entries: Any = None
    if saver is not None and saver.config is not None:
        trainer_config = saver.config.get("trainer")
        entries = trainer_config.get("callbacks") if trainer_config is not None else None
    entries = entries if isinstance(entries, list) else [entries] if entries else []
    queues: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        class_path = entry.get("class_path") if hasattr(entry, "get") else None
        if not isinstance(class_path, str):
            continue
        init_args = entry.get("init_args")
        arguments = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {})
        queues.setdefault(class_path.rsplit(".", 1)[-1], []).append(arguments)

    def lookup(callback: Callback) -> dict[str, Any] | None:
        queue = queues.get(type(callback).__name__)
        return queue.pop(0) if queue else None

    return lookup
