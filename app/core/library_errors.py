"""The third-party errors Mneme can only recognise by their message text, all in one place.

Each library here raises a generic type (``ValueError``, ``RuntimeError``, ...) for a user's
bad input, with no subclass or attribute to tell it from a bug: the message is all there is.
Each function returns what Mneme's one-line error needs, or ``None``/``False`` when the text
is not that error; ``tests/test_library_errors.py`` checks each against the pinned library.
Mneme's own errors are typed (:mod:`mneme.app.core.errors`) and never parsed.
"""

from __future__ import annotations

import re


def _text(error: BaseException | str) -> str:
    return error if isinstance(error, str) else str(error)


def peft_target_modules_missing(error: BaseException) -> bool:
    """peft: no module of the model matches ``target_modules``. Typed
    (``peft.NoMatchingPeftModuleError``) in the peft releases that have it; a ``ValueError``
    known by its text in the older ones ``pyproject.toml`` allows."""
    import peft

    typed = getattr(peft, "NoMatchingPeftModuleError", None)
    if typed is not None:
        return isinstance(error, typed)
    text = _text(error)
    return isinstance(error, ValueError) and ("Target modules" in text or "not found" in text)


def jsonargparse_no_union_match(error: BaseException | str) -> bool:
    """jsonargparse (``ValueError``/``ArgumentError`` while instantiating a class): a value
    fits none of a union's types; its message lists each type's own complaint."""
    return "Does not validate against any of the" in _text(error)


def torch_state_dict_mismatch(error: BaseException) -> str | None:
    """torch ``load_state_dict`` (``RuntimeError``): the checkpoint's tensors do not fit the
    model; the first line of its detail (missing/unexpected keys, size mismatches)."""
    text = _text(error).strip()
    if not isinstance(error, RuntimeError) or "Error(s) in loading state_dict" not in text:
        return None
    return next((s.strip() for s in text.splitlines()[1:] if s.strip()), "")


def lightning_config_file_exists(error: BaseException) -> str | None:
    """Lightning's ``SaveConfigCallback`` (``RuntimeError``): an earlier run's config file is
    where it would write; that path (``config.yaml`` when the text does not say)."""
    text = _text(error)
    if not isinstance(error, RuntimeError) or "SaveConfigCallback expected" not in text:
        return None
    found = re.search(r"expected (\S+) to NOT exist", text)
    return found.group(1) if found else "config.yaml"


def lightning_accelerator_unavailable(text: str) -> bool:
    """Lightning's ``MisconfigurationException`` for an accelerator the machine lacks."""
    return re.search("not available|no supported", text, re.IGNORECASE) is not None


def torchvision_download_failure(error: BaseException) -> str | None:
    """torchvision (``RuntimeError("Error downloading ...")``, its cause kept only as text):
    the first and last lines, or ``None``."""
    text = _text(error)
    if not text.startswith("Error downloading"):
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{lines[0]} {lines[-1]}"


def dataloader_worker_message(error: BaseException, type_name: str) -> str:
    """The original message of an exception a ``DataLoader`` worker raised: torch re-raises
    it in the main process with the worker's traceback prepended as text
    (``Caught X in DataLoader worker process 0. Original Traceback ... X: message``)."""
    lines = [line for line in _text(error).splitlines() if line.strip()]
    return lines[-1].split(f"{type_name}: ", 1)[-1] if lines else _text(error)


def ddp_failure(error: BaseException) -> str | None:
    """torch.distributed / Lightning DDP (``RuntimeError``, ``DistBackendError``): what ended
    a DDP step, found in the exception chain: ``"unused_parameters"`` (DDP's reducer: a
    parameter got no gradient; Lightning's or torch's wording), ``"peer_gone"`` (gloo/NCCL:
    another process of the group closed its connection: killed or crashed) or
    ``"timeout"`` (a collective waited out the process group's timeout: a stopped or hung
    process); ``None`` otherwise."""
    seen: BaseException | None = error
    while seen is not None:
        text = _text(seen)
        if isinstance(seen, RuntimeError):
            if "were not used in producing the loss" in text or (
                "finished reduction in the prior iteration" in text
            ):
                return "unused_parameters"
            if re.search(r"Connection (reset|closed) by peer|Broken pipe|process exited", text):
                return "peer_gone"
            # a collective (gloo, NCCL's watchdog) or the start-up rendezvous (TCPStore)
            timed_out = r"(?i)timed out (waiting|after) \d+ms|timeout caused pair closure"
            if re.search(timed_out + "|collective operation timeout", text):
                return "timeout"
        seen = seen.__cause__ or seen.__context__
    return None
