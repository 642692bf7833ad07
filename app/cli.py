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


def build_cli(args: list[str] | None = None, run: bool = True):
    """Build (and by default run) the LightningCLI; ``run=False`` only instantiates."""
    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from mneme.app.errors import summarize_argument_error
    from mneme.callbacks import ContinualMetrics, FiniteLossGuard
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
                check_checkpoint(self.config[subcommand].get("ckpt_path"))

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ContinualMetrics, "metrics")
            parser.add_lightning_class_args(FiniteLossGuard, "finite_loss_guard")
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            # Save after the experience-end work of other callbacks (Fisher, buffers), and
            # keep last.ckpt to resume from.
            parser.set_defaults(
                {"checkpoint.save_last": True, "checkpoint.save_on_train_epoch_end": True}
            )

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
            "num_sanity_val_steps": 0,
        },
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=run,
    )


class ConfigError(ValueError):
    """A configuration problem, already summarized in one line."""


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


def check_checkpoint(ckpt_path: str | None) -> None:
    """Fail early, in one line, on a missing, truncated or unsafe checkpoint file.

    Loading with ``weights_only=True`` refuses pickled code: a Mneme checkpoint holds only
    tensors and plain data, so anything else is not one of ours.
    """
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return
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


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] not in SUBCOMMANDS:
        sys.exit(
            f"mneme: error: unknown subcommand '{argv[0]}'; use one of {', '.join(SUBCOMMANDS)}"
        )
    warnings.filterwarnings("ignore", message="no QP solver found")  # avalanche's import
    if os.environ.get("MNEME_DEBUG"):
        build_cli(args)
        return
    try:
        build_cli(args)
    except ConfigError as error:
        sys.exit(f"mneme: error: {error}")
    except (ValueError, TypeError, OSError, RuntimeError, KeyError, ImportError) as error:
        from mneme.app.errors import summarize_exception

        sys.exit(f"mneme: error: {summarize_exception(error)} (MNEME_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
    main()
