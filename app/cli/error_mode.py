"""How a command reports a user's error: one line (printed once under DDP), or with
``MNEME_DEBUG=1`` the traceback. Shared by ``main`` and the ``tune``/``export`` commands,
which ``main`` imports (so they do not import it back)."""

from __future__ import annotations

import os
import sys


def debug_mode() -> bool:
    """``MNEME_DEBUG`` on: 1, true or yes (any case); 0, false, no or empty leave it off."""
    return os.environ.get("MNEME_DEBUG", "").strip().lower() in ("1", "true", "yes")


def rank_zero_error(message: str) -> None:
    """The one error line, printed once under DDP (by rank 0)."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"mneme: error: {message}", file=sys.stderr, flush=True)
