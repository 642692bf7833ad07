"""The LightningCLI parser of a subcommand: ``build_cli`` builds (and by default runs) it.

Lightning is imported only when it is called (``mneme.app.cli.lightning_cli``), so that
``mneme --help`` stays light; the constants and helpers are in ``mneme.app.cli.commands``.
"""

from __future__ import annotations

import sys
from typing import Any

from mneme.app.cli.commands import FEWSHOT


def build_cli(
    args: Any = None,
    run: bool = True,
    fewshot: bool = False,
    extra_callbacks=(),
    parse_only: bool = False,
):
    """Build (and by default run) the LightningCLI; ``run=False`` only instantiates.
    ``fewshot``: episodes (``EpisodicDataModule``) and the few-shot report instead of a
    stream of experiences and its accuracy matrix. ``extra_callbacks``: live callbacks added
    to the trainer's (``mneme tune``'s pruning, which holds an Optuna trial).
    ``parse_only``: return the parsed configuration (a jsonargparse ``Namespace``, every
    default filled in) before anything is instantiated or any folder claimed; ``args`` may
    be such a Namespace (``mneme tune``'s trial, its sampled values set on it)."""
    from jsonargparse import Namespace
    from lightning.pytorch import LightningModule
    from mneme.app.cli.lightning_cli import MnemeCLI, ParsedConfig, Request
    from mneme.datamodules import ContinualDataModule, EpisodicDataModule

    parsed = isinstance(args, Namespace)  # a configuration this parser made, not text
    asked = [args["subcommand"]] if parsed else (args if args is not None else sys.argv[1:])[:1]
    request = Request(
        asked=asked,
        parsed=parsed,
        fewshot=fewshot,
        parse_only=parse_only,
        extra_callbacks=extra_callbacks,
        command_name=" ".join([FEWSHOT] * fewshot + asked),  # as option_keys records it
    )
    try:
        return MnemeCLI(
            request,
            LightningModule,
            EpisodicDataModule if fewshot else ContinualDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "logs", "name": "fewshot" if fewshot else "mneme"},
                },
            },
            parser_kwargs={"exit_on_error": False},
            args=args,
            run=run,
        )
    except ParsedConfig as done:
        return done.config
