"""Turn the errors users meet into one line that names the field and the fix.

jsonargparse reports a bad key of a subclass-typed argument as a nested, multi-line
explanation (every type it tried, the value's Python type, ...). Users need the key, the
reason, and a likely correction; nothing in jsonargparse or Lightning condenses that, so it
is done here. Set ``MNEME_DEBUG=1`` for the full traceback instead.

Structure first, text only where there is none: jsonargparse 4.53 raises
``argparse.ArgumentError(None, message)`` for every parse problem (no ``argument_name``,
no key, no value: the chained causes are ``TypeError``/``ValueError``/``NSKeyError`` that
carry text only), so the key, the class path and the reasons below are read from its
English message. The option names a misspelling is compared with come from the parser's
public ``get_defaults()`` (see ``mneme.app.cli.commands.known_keys``).
"""

from __future__ import annotations

import difflib
import errno
import re

from mneme.app.core import library_errors

NOISE = (
    "Expected a <class 'NoneType'>",
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Does not validate against any of the types",
    "Validation failed:",
    "tip: For details",
    "Not a valid subclass",
    "Subclass types expect",
    "a class path (str)",
    "a dict with",
    "a dict without",
)
MAX_LENGTH = 400


def summarize_argument_error(message: str, known_keys: list[str] | None = None) -> str:
    """One line from a jsonargparse error: the key, the innermost reasons, a suggestion."""
    if m := re.search(r"unrecognized arguments: (--?[\w.\-]+)", message):
        return unknown_option(m.group(1).lstrip("-"), known_keys)
    if m := re.search(r"Key '([\w.]+)' is not expected", message):
        key = m.group(1)
        return f"{key}: unknown key{_suggest(key, known_keys)}"
    if m := re.search(r"module '([\w.]+)' has no attribute '(\w+)'", message):
        key = k.group(1) if (k := re.search(r'Parser key "([^"]+)"', message)) else "config"
        path = f"{m.group(1)}.{m.group(2)}"
        close = difflib.get_close_matches(m.group(2), _public_names(m.group(1)), n=1)
        hint = f"; did you mean '{m.group(1)}.{close[0]}'?" if close else ""
        return _clip(f"{key}: cannot import '{path}'{hint}")
    key = m.group(1) if (m := re.search(r'Parser key "([^"]+)"', message)) else None
    message = re.sub(r'Parser key "[^"]+":\s*', "", message)
    class_path = m.group(1) if (m := re.search(r"class_path '([\w.]+)'", message)) else None
    reasons = []
    for line in message.splitlines():
        line = line.strip(" -\t")
        if not line or line.startswith("Parser key") or any(n in line for n in NOISE):
            continue
        if line.startswith("Problem with given class_path"):
            continue
        if option := re.search(r"Option '(\w+)' is not accepted", line):
            line = f"'{option.group(1)}' is not an argument of {class_path}"
            line += _suggest(option.group(1), known_keys)
        elif "No module named" in line:
            line = f"cannot import class_path '{class_path}' ({line})"
        if line not in reasons:
            reasons.append(line)
    text = "; ".join(reasons) or message.strip()
    return _clip(f"{key}: {text}" if key else text)


def unknown_option(key: str, known_keys: list[str] | None = None) -> str:
    """The line for a command-line option no parser option takes, with the closest name."""
    return f"{key}: unknown option{_suggest(key, known_keys)}"


def _public_names(module: str) -> list[str]:
    import importlib

    try:
        return [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
    except ImportError:
        return []


def _suggest(key: str, known_keys: list[str] | None) -> str:
    if not known_keys:
        return ""
    last = key.rsplit(".", 1)[-1]
    names = {k.rsplit(".", 1)[-1]: k for k in known_keys}
    close = difflib.get_close_matches(key, known_keys, n=1, cutoff=0.75)
    close = close or [names[c] for c in difflib.get_close_matches(last, list(names), n=1)]
    return f"; did you mean '{close[0]}'?" if close else "; see `mneme fit --help`"


def summarize_library_error(error: BaseException) -> str | None:
    """One line for the errors libraries raise on a user's bad input (jsonargparse while
    instantiating a class, torch loading a checkpoint into another model, the OS refusing
    a path); ``None`` for anything else, which is a bug and keeps its traceback."""
    text = str(error).strip() or type(error).__name__
    if library_errors.jsonargparse_no_union_match(text):  # while instantiating a class
        return summarize_argument_error(text)
    if (detail := library_errors.torch_state_dict_mismatch(error)) is not None:
        return _clip(
            f"ckpt_path: the checkpoint does not fit this model ({detail}); "
            "use the config the checkpoint was trained with"
        )
    if (where := library_errors.lightning_config_file_exists(error)) is not None:
        # without a logger the run's config.yaml goes to trainer.default_root_dir (the
        # working folder): an earlier run's is there, and Lightning refuses to overwrite it
        return _clip(
            f"trainer.logger: without a logger the run writes its config to {where}, and an "
            "earlier run's is there (kept); run in another folder, set trainer.default_root_dir, "
            "or keep the TensorBoard logger (each run gets its own version folder)"
        )
    if failure := library_errors.ddp_failure(error):
        return _clip(DDP_FAILURES[failure].format(timeout=ddp_timeout_s()))
    if download := _download_failure(error):
        return _clip(
            f"data.benchmark_args.dataset_root: the benchmark downloads its data, which failed "
            f"({download}); download it where there is internet into a folder and pass it as "
            "data.benchmark_args.dataset_root, or use an offline stream (see "
            "configs/quickstart.yaml)"
        )
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return _clip(
            f"no space left on the device of '{error.filename or 'the log folder'}'; free space "
            "there or point trainer.logger.init_args.save_dir (and checkpoint.dirpath) at "
            "another disk"
        )
    if isinstance(error, OSError) and error.filename and error.strerror:
        return _clip(
            f"cannot write or read '{error.filename}': {error.strerror}; check the paths in "
            "the config (trainer.logger.init_args.save_dir, trainer.default_root_dir, data files)"
        )
    return None


# What ends a DDP process, in one line each rank prints (see mneme.app.cli.ddp_exit: the
# run's other processes end with it, so no rank waits longer than MNEME_DDP_TIMEOUT).
DDP_FAILURES = {
    "unused_parameters": (
        "trainer.strategy: the model leaves parameters without a gradient in a step (a "
        "mixture-of-experts head runs only its top_k experts per sample), which plain DDP "
        "refuses; use --trainer.strategy ddp_find_unused_parameters_true"
    ),
    "peer_gone": (
        "trainer.devices: another process of this DDP run ended (killed or crashed; its own "
        "output says why), so this one stops too; resume with --ckpt_path <run>/checkpoints/"
        "last.ckpt"
    ),
    "timeout": (
        "trainer.devices: a process of this DDP run did not answer for MNEME_DDP_TIMEOUT="
        "{timeout} s (stopped or hung), so the run stops; raise MNEME_DDP_TIMEOUT for steps "
        "that take longer, or resume with --ckpt_path <run>/checkpoints/last.ckpt"
    ),
}


def ddp_timeout_s() -> int:
    from mneme.app.cli.ddp_exit import DDP_TIMEOUT_S

    return DDP_TIMEOUT_S


def _download_failure(error: BaseException) -> str | None:
    """The innermost reason of a failed dataset download (torchvision, Avalanche), found by
    type in the exception chain (``URLError``, socket errors) or, where torchvision keeps
    only text (``RuntimeError("Error downloading ...")``), by its message."""
    import urllib.error

    seen = error
    while seen is not None:
        if isinstance(seen, (urllib.error.URLError, ConnectionError, TimeoutError)):
            return _clip(str(getattr(seen, "reason", seen)))[:160]
        if (failure := library_errors.torchvision_download_failure(seen)) is not None:
            return _clip(failure)[:200]
        seen = seen.__cause__ or seen.__context__
    return None


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_LENGTH else text[: MAX_LENGTH - 3] + "..."
