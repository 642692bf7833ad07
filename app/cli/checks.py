"""Checks a subcommand makes before Lightning runs: the checkpoint (a file, weights only, the
model class the config names), weight files, the checkpoint folder, trainer settings."""

from __future__ import annotations

import re
from pathlib import Path

from mneme.app.cli.run_folders import log_root
from mneme.app.core.errors import ConfigError

# Subcommands that evaluate a trained model: without a checkpoint they would score random
# weights and exit 0.
EVALUATING = ("validate", "test", "predict")


def resolve_ckpt_path(subcommand: str, config) -> str | None:
    """The checkpoint a run starts from: ``last`` is the newest ``last.ckpt`` of this
    config's runs; an evaluating subcommand needs one."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is None and subcommand in EVALUATING:
        raise ConfigError(
            f"ckpt_path: `mneme {subcommand}` evaluates a trained model; pass --ckpt_path "
            "<log_dir>/checkpoints/last.ckpt (or `last`, this config's newest run)"
        )
    if ckpt_path in ("best", "hpc", "registry"):
        raise ConfigError(
            f"ckpt_path: '{ckpt_path}' is not kept by mneme; pass a checkpoint file, or `last`"
        )
    if ckpt_path != "last":
        return ckpt_path
    dirpath = config.get("checkpoint", {}).get("dirpath")
    candidates = [Path(dirpath) / "last.ckpt"] if dirpath else []
    if not candidates:
        root = log_root(config["trainer"])
        versions = root.glob("*/checkpoints/last.ckpt") if root else []
        candidates = sorted(versions, key=lambda p: p.stat().st_mtime, reverse=True)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        where = candidates[0] if candidates else f"{log_root(config['trainer'])}/*/checkpoints"
        raise ConfigError(
            f"ckpt_path: 'last' found no last.ckpt ({where}); pass the checkpoint file, "
            "or train first"
        )
    return str(found)


def check_weight_files(init_args) -> None:
    """Refuse a model weights file (``model.encoder_weights``, ...) that does not exist:
    timm's loader raises ``FileNotFoundError`` without naming it."""
    from mneme.app.nn.backbones import resolve_weights_path

    for key, value in init_args.items() if hasattr(init_args, "items") else []:
        if key.endswith("weights") and isinstance(value, str):
            resolve_weights_path(value, f"model.{key}")


def check_checkpoint_dirpath(subcommand: str, config) -> None:
    """Refuse a ``checkpoint.dirpath`` that already holds checkpoints (an earlier run's)."""
    dirpath = config.get("checkpoint", {}).get("dirpath")
    if subcommand != "fit" or not dirpath or not Path(dirpath).is_dir():
        return
    if any(Path(dirpath).glob("*.ckpt")):
        raise ConfigError(
            f"checkpoint.dirpath: '{dirpath}' holds an earlier run's checkpoints, which a new "
            "run never overwrites; choose an empty folder, or leave it unset "
            "(<log_dir>/checkpoints)"
        )


def trainer_setting_error(error: Exception, user: dict) -> str:
    """One line for Lightning's refusal of a trainer setting, naming the fields it mentions."""
    text = " ".join(str(error).split())
    named = [k for k in ("devices", "accelerator", "strategy", "num_nodes", "precision")
             if re.search(rf"\b{k}\b", text, re.IGNORECASE)
             or isinstance(user.get(k), str) and user[k] != "auto"
             and user[k].lower() in text.lower()]  # fmt: skip
    fields = ", ".join(f"trainer.{k}" for k in named) or "trainer"
    if "accelerator" in named and re.search("not available|no supported", text, re.I):
        text += " Use --trainer.accelerator cpu (or auto)"
    return f"{fields}: {text}"[:450]


def check_checkpoint(ckpt_path: str | None) -> dict | None:
    """Fail early, in one line, on a missing, truncated or unsafe checkpoint file.

    Loading with ``weights_only=True`` refuses pickled code: a Mneme checkpoint holds only
    tensors and plain data, so anything else is not one of ours.
    """
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at '{path}'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure to read means the same to the user
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ConfigError(
            f"ckpt_path: cannot read '{path}' as a checkpoint (truncated, corrupted or not "
            f"saved by mneme: {type(error).__name__} {reason}); resume from another "
            "checkpoint, e.g. the epoch checkpoint next to last.ckpt"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt_path: '{path}' is not a Lightning checkpoint (no state_dict)")
    return checkpoint


# Class paths of checkpoints saved before the `mneme` namespace (0.1.0: `app.X`).
LEGACY_PREFIXES = {"app.": "mneme.app."}


def check_checkpoint_model(checkpoint: dict | None, model_class_path: str) -> None:
    """Refuse a checkpoint whose module class is not the config's (compared as text:
    nothing the checkpoint names is imported)."""
    saved = (checkpoint or {}).get("hyper_parameters", {}).get("_class_path")
    if not isinstance(saved, str):
        return
    for old, new in LEGACY_PREFIXES.items():
        saved = new + saved[len(old) :] if saved.startswith(old) else saved
    if saved != model_class_path:
        raise ConfigError(
            f"ckpt_path: the checkpoint holds a {saved}, but model.class_path is "
            f"{model_class_path}; use the config the checkpoint was trained with"
        )
