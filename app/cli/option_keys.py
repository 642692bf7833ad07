"""Option names known before any heavy import, so that a misspelled command-line option is
reported at once instead of after the 6-8 s that importing Lightning, Avalanche and timm
takes (LightningCLI builds its option names from every class's signature, which needs
those imports; jsonargparse has no way to build a parser from signatures without them).

Each full parse records its subcommand's option names in a small cache file named by a
fingerprint of everything that could change them: Mneme's own source files (size and
modification time) and the installed versions of the libraries whose signatures make up
the parser. A later command checks its ``--key`` options against that record first. A key
is refused here only when the record rules it out for sure: anything under a field whose
value is a class or a mapping (``--model.init_args.*``, ``--model.lr``,
``--data.benchmark_args.*``) is left to the full parser, and with no record (a first run,
a changed file, an unwritable cache folder) every option is.

Nothing here imports more than the standard library.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

# The libraries whose signatures (or option handling) make up the parser.
LIBRARIES = (
    "lightning",
    "jsonargparse",
    "torch",
    "torchmetrics",
    "timm",
    "open_clip_torch",
    "avalanche-lib",
    "transformers",
    "peft",
)
# Options of the parser itself, not configuration keys.
NOT_KEYS = {"config", "c", "help", "h", "print_config"}
PACKAGE_FOLDERS = ("app", "callbacks", "datamodules")


def cache_folder() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mneme" / "options"


@functools.cache  # once a process: the early check and the parse's record both need it
def fingerprint() -> str:
    """What the recorded option names depend on: Mneme's source files and the libraries'
    versions (a file edited or a library upgraded gives another fingerprint)."""
    digest = hashlib.sha256(sys.version.encode())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=absent".encode())
    # app/cli/option_keys.py: the package folders are siblings of app/, in a checkout
    # (app/, callbacks/, datamodules/) as in an installed mneme/ folder
    root = Path(__file__).resolve().parents[2]
    for folder in PACKAGE_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _record_path() -> Path:
    return cache_folder() / f"{fingerprint()}.json"


def record(command: str, keys: Iterable[str]) -> None:
    """Keep ``command``'s option names (``fit``, ``fewshot test``, ...) for later commands;
    a cache that cannot be written only costs the early check."""
    try:
        path = _record_path()
        known = json.loads(path.read_text()) if path.is_file() else {}
        names = sorted(set(keys))
        if known.get(command) == names:
            return
        known[command] = names
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(known))
        os.replace(partial, path)  # whole or absent, for a concurrent reader
    except (OSError, ValueError):
        return


def recorded(command: str) -> list[str] | None:
    try:
        path = _record_path()
        if not path.is_file():
            return None
        keys = json.loads(path.read_text()).get(command)
    except (OSError, ValueError, AttributeError):
        return None
    return keys if isinstance(keys, list) else None


def option_keys(argv: Sequence[str]) -> list[str]:
    """The configuration keys a command line sets (``--data.batch_size 8``,
    ``--data.batch_size=8``, ``--trainer.callbacks+=X``)."""
    keys = []
    for token in argv:
        if not token.startswith("--") or len(token) == 2:
            continue
        key = token[2:].split("=", 1)[0].rstrip("+")
        if key and key not in NOT_KEYS and not key.startswith("print_"):
            keys.append(key)
    return keys


def unknown_key(key: str, known: Sequence[str]) -> bool:
    """``True`` only when no option of the parser can take ``key``: not an option, not
    under an option whose value is a class or a mapping, not a section of options."""
    if key in known:
        return False
    return not any(key.startswith(k + ".") or k.startswith(key + ".") for k in known)


def first_unknown_option(command: str, argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """The first command-line key the record of ``command`` rules out, with the record (for
    a suggestion); ``None`` when all may be right or there is no record."""
    known = recorded(command)
    if not known:
        return None
    for key in option_keys(argv):
        if unknown_key(key, known):
            return key, known
    return None
