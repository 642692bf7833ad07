"""Reading a Mneme checkpoint safely, and the trained module it holds.

Loading with ``weights_only=True`` refuses pickled code: a Mneme checkpoint holds only
tensors and plain data, so anything else is not one of ours. The module class a checkpoint
holds is read as text (its recorded ``_class_path``) and imported only when it is one the
caller accepts, as a config's ``class_path`` is: this is how a callback (a teacher) or the
few-shot evaluator loads a trained LightningModule without importing ``mneme.app.models``
(the import contracts in ``pyproject.toml`` keep callbacks below the modules).

No Lightning here, and torch only inside the functions (the CLI imports this module
before it knows whether it will need torch): the class found is asked to
``load_from_checkpoint`` itself.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError

# Class paths of checkpoints saved before the `mneme` namespace (0.1.0: `app.X`).
LEGACY_PREFIXES = {"app.": "mneme.app."}
# The trained modules other runs load (a teacher, the few-shot evaluator), by class path,
# and the names they are exported under (configs write ``mneme.app.X``).
CLASSIFIER = "mneme.app.models.classifier.ContinualClassifier"
ALIGNER = "mneme.app.models.aligner.ContrastiveAligner"
ALIASES = {"mneme.app.ContinualClassifier": CLASSIFIER, "mneme.app.ContrastiveAligner": ALIGNER}
# Values of ``ckpt_path`` that Lightning resolves itself (not files).
NOT_A_FILE = ("last", "best", "hpc", "registry")


def check_checkpoint(ckpt_path: str | None, field: str = "ckpt_path") -> dict | None:
    """Fail early, in one line naming ``field``, on a missing, truncated or unsafe checkpoint
    file; the checkpoint (tensors memory-mapped), or ``None`` for no file or one of
    :data:`NOT_A_FILE`."""
    if not ckpt_path or ckpt_path in NOT_A_FILE:
        return None
    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"{field}: no checkpoint file at '{path}'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure to read means the same to the user
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ConfigError(
            f"{field}: cannot read '{path}' as a checkpoint (truncated, corrupted or not "
            f"saved by mneme: {type(error).__name__} {reason}); resume from another "
            "checkpoint, e.g. the epoch checkpoint next to last.ckpt"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{field}: '{path}' is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def saved_class_path(checkpoint: Mapping[str, Any] | None) -> str | None:
    """The module class path the CLI recorded in the checkpoint (0.1.0's ``app.X`` read as
    ``mneme.app.X``), or ``None`` when it recorded none."""
    saved = ((checkpoint or {}).get("hyper_parameters") or {}).get("_class_path")
    if not isinstance(saved, str):
        return None
    for old, new in LEGACY_PREFIXES.items():
        saved = new + saved[len(old) :] if saved.startswith(old) else saved
    return saved


def import_class(class_path: str) -> type:
    """The class at ``package.module.Name``."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def checkpoint_class_path(
    checkpoint: Mapping[str, Any],
    path: str,
    accepted: Sequence[str],
    aliases: Mapping[str, str],
    field: str,
    purpose: str,
) -> str:
    """The one of ``accepted`` class paths the checkpoint holds: its recorded ``_class_path``
    (through ``aliases``, e.g. the ``mneme.app.X`` export names), else the one class whose
    arguments cover every saved hyperparameter."""
    names = " or ".join(k for k, v in aliases.items() if v in accepted) or " or ".join(accepted)
    saved = saved_class_path(checkpoint)
    if saved is not None:
        saved = aliases.get(saved, saved)
        if saved not in accepted:
            raise ConfigError(
                f"{field}: '{path}' holds a {saved}; {purpose} takes a checkpoint of {names}"
            )
        return saved
    keys = {k for k in checkpoint.get("hyper_parameters") or {} if not k.startswith("_")}
    fits = [
        c
        for c in accepted
        if keys and keys <= set(inspect.signature(import_class(c).__init__).parameters)
    ]
    if len(fits) != 1:
        raise ConfigError(
            f"{field}: '{path}' is not a checkpoint of {names} (its hyperparameters fit neither)"
        )
    return fits[0]


def load_trained_module(
    path: str, accepted: Sequence[str], aliases: Mapping[str, str], field: str, purpose: str
) -> Any:
    """The trained module (eval mode, frozen) of the checkpoint at ``path``, which must be
    one of the ``accepted`` class paths; refused in one line naming ``field`` when it is
    another module's, unsafe (``weights_only``) or unreadable."""
    checkpoint = check_checkpoint(path, field)
    if checkpoint is None:
        raise ConfigError(f"{field}: a checkpoint file, got {path!r}")
    from mneme.app.core.finite_weights import check_finite_weights
    from mneme.app.core.private_api import outside_hyperparameter_context  # imports torch

    check_finite_weights(checkpoint, path, field)  # a diverged teacher teaches NaN
    cls: Any = import_class(
        checkpoint_class_path(checkpoint, path, accepted, aliases, field, purpose)
    )
    try:
        model = outside_hyperparameter_context(
            cls.load_from_checkpoint, path, map_location="cpu", weights_only=True
        )
    except RuntimeError as error:  # torch's word for tensors that do not fit the module
        if "Error(s) in loading state_dict" not in str(error):
            raise
        detail = next((s.strip() for s in str(error).splitlines()[1:] if s.strip()), "")
        raise ConfigError(
            f"{field}: '{path}' does not fit a {cls.__name__} ({detail[:200]}); give a "
            f"checkpoint {purpose} can load"
        ) from None
    return model.eval().requires_grad_(False)
