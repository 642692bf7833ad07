"""Checks a subcommand makes before Lightning runs: the checkpoint (a file, weights only, the
model class the config names), weight files, the checkpoint folder, trainer settings."""

from __future__ import annotations

import re
from pathlib import Path

from mneme.app.cli.run_folders import log_root
from mneme.app.core.checkpoints import check_checkpoint, saved_class_path  # noqa: F401 - re-export
from mneme.app.core.errors import ConfigError
from mneme.app.core.library_errors import lightning_accelerator_unavailable

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
    if "accelerator" in named and lightning_accelerator_unavailable(text):
        text += " Use --trainer.accelerator cpu (or auto)"
    return f"{fields}: {text}"[:450]


def check_checkpoint_model(checkpoint: dict | None, model_class_path: str) -> None:
    """Refuse a checkpoint whose module class is not the config's (compared as text:
    nothing the checkpoint names is imported)."""
    saved = saved_class_path(checkpoint)
    if saved is not None and saved != model_class_path:
        raise ConfigError(
            f"ckpt_path: the checkpoint holds a {saved}, but model.class_path is "
            f"{model_class_path}; use the config the checkpoint was trained with"
        )
