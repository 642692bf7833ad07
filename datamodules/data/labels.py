"""The largest class label a stream may hold, checked where a stream reads its labels.

A head has one output per class index, and so do Avalanche's class bookkeeping and a
stream's own label index: a stray label of 10**9 in a file asks them for gigabytes
(``MemoryError`` inside ``nc_benchmark``) before the datamodule could compare the labels
with ``data.max_classes``. So the datamodule states its limit while it builds the stream
(:func:`class_limit`), and each stream that reads labels from a file calls
:func:`check_labels` on them before anything is sized by class.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from mneme.app.core.errors import ConfigError

DEFAULT_MAX_CLASSES = 100_000  # data.max_classes' default
_LIMIT: ContextVar[int] = ContextVar("mneme_max_classes", default=DEFAULT_MAX_CLASSES)


@contextmanager
def class_limit(max_classes: int) -> Iterator[None]:
    """Streams built inside refuse labels of ``max_classes`` or more."""
    token = _LIMIT.set(int(max_classes))
    try:
        yield
    finally:
        _LIMIT.reset(token)


def check_labels(largest: int, where: str) -> None:
    """Refuse a largest label at or over the limit in force, naming ``where`` (the field
    and file that hold it)."""
    limit = _LIMIT.get()
    if largest >= limit:
        raise ConfigError(
            f"{where}: holds the label {largest:,}, so a head would have {largest + 1:,} "
            f"outputs (data.max_classes: {limit:,}); labels are class indices 0..C-1: "
            "relabel them, or raise data.max_classes"
        )
