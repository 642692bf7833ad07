"""The ``mneme`` command: a LightningCLI over Mneme's modules, datamodule and callbacks.

Heavy libraries (Lightning, Avalanche, timm) are imported only when a subcommand runs, so
``mneme --help`` answers at once.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

from mneme.datamodules.errors import ConfigError, MnemeError

USAGE = """usage: mneme {fit,validate,test,predict} --config CONFIG.yaml [options]

Continual and multimodal learning on PyTorch Lightning.

subcommands:
  fit        train over the whole stream of experiences
  validate   evaluate on every test experience
  test       evaluate a checkpoint (--ckpt_path) on the whole test stream
  predict    predict on the test stream

`mneme fit --help` lists every option; `mneme fit --config configs/quickstart.yaml
--print_config` prints the full configuration.
"""

SUBCOMMANDS = ("fit", "validate", "test", "predict")


SCHEDULE_KEYS = (
    "max_epochs",
    "reload_dataloaders_every_n_epochs",
    "check_val_every_n_epoch",
    "num_sanity_val_steps",
)


def build_cli(args: list[str] | None = None, run: bool = True):
    """Build (and by default run) the LightningCLI; ``run=False`` only instantiates."""
    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI
    from mneme.app.errors import summarize_argument_error
    from mneme.callbacks import (
        ContinualMetrics,
        ExperienceCheckpoint,
        FiniteLossGuard,
        StreamProgressBar,
    )
    from mneme.datamodules import ContinualDataModule

    class MnemeCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as error:
                message = str(error).replace(
                    "Problems parsing config:", "invalid YAML in --config:"
                )
                summary = summarize_argument_error(message, known_keys(parser, message))
                raise ConfigError(summary) from None
            subcommand = self.config.get("subcommand")
            if subcommand:
                config = self.config[subcommand]
                checkpoint = check_checkpoint(config.get("ckpt_path"))
                check_checkpoint_model(checkpoint, config["model"]["class_path"])

        def _parse_ckpt_path(self) -> None:
            # Lightning would merge the checkpoint's hyper_parameters into the config here,
            # and their `_class_path` would decide which module gets imported: a crafted
            # (yet weights_only-safe) checkpoint could import any installed module. The
            # config decides the run; parse_arguments checked that the checkpoint fits it.
            return

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ContinualMetrics, "metrics")
            parser.add_lightning_class_args(FiniteLossGuard, "finite_loss_guard")
            parser.add_lightning_class_args(ExperienceCheckpoint, "checkpoint")

        def instantiate_trainer(self, **kwargs):
            """The trainer, with the settings the experience schedule needs (a user setting
            that conflicts is refused, never overwritten) and the stream's progress bar."""
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            user = config["trainer"]
            kwargs.update(self.datamodule.trainer_settings(**{k: user[k] for k in SCHEDULE_KEYS}))
            show = user["enable_progress_bar"]
            if show is None:  # on in an interactive terminal, off in CI logs and files
                show = sys.stderr.isatty() and not os.environ.get("CI")
            callbacks = user["callbacks"] or []
            callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
            if show and not any(isinstance(c, ProgressBar) for c in callbacks):
                callbacks.append(StreamProgressBar())
            kwargs.update(enable_progress_bar=bool(show), callbacks=callbacks)
            return super().instantiate_trainer(**kwargs)

    return MnemeCLI(
        LightningModule,
        ContinualDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "logs", "name": "mneme"},
            },
        },
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=run,
    )


def known_keys(parser, message: str) -> list[str]:
    """Option names a misspelled key may have meant: the subcommand's options, and the
    arguments of the class the error is about."""
    import importlib
    import inspect

    keys: list[str] = []
    for sub in getattr(parser._subcommands_action, "_name_parser_map", {}).values():
        keys += [a.dest for a in sub._actions if a.dest and a.dest != "help"]
    for class_path in re.findall(r"class_path '([\w.]+)'", message):
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
            keys += list(inspect.signature(cls).parameters)
        except (ImportError, AttributeError, ValueError, TypeError):
            continue
    return keys


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


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] not in SUBCOMMANDS:
        sys.exit(
            f"mneme: error: unknown subcommand '{argv[0]}'; use one of {', '.join(SUBCOMMANDS)}"
        )
    quiet_known_noise()
    if os.environ.get("MNEME_DEBUG"):
        build_cli(args)
        return
    try:
        build_cli(args)
    except MnemeError as error:
        sys.exit(f"mneme: error: {error}")
    except Exception as error:
        from mneme.app.errors import summarize_library_error

        summary = summarize_library_error(error)
        if summary is None:
            raise  # not an error of the user's input: a bug, with its traceback
        sys.exit(f"mneme: error: {summary} (MNEME_DEBUG=1 shows the traceback)")


def quiet_known_noise() -> None:
    """Silence third-party messages that are false or not actionable for a Mneme run, and
    only those (each matched by its text, so every other warning stays visible)."""
    import logging

    # avalanche's import, for an optional solver that no Mneme strategy uses
    warnings.filterwarnings("ignore", message="no QP solver found")
    # lightning's own use of torch's pytree API, deprecated in torch 2.14: not ours to fix
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning logs on the global-step cadence across epochs, so a short experience
    # (fewer batches than log_every_n_steps) still logs: the warning is false for a stream
    warnings.filterwarnings("ignore", message=r"The number of training batches .* logging")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertising())


class _NoAdvertising:
    """Drops Lightning's tip to install its cloud logger."""

    @staticmethod
    def filter(record) -> bool:
        return "litlogger" not in record.getMessage()


if __name__ == "__main__":
    main()
