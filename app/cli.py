"""The ``mneme`` command: a LightningCLI over Mneme's modules, datamodule and callbacks.

Heavy libraries (Lightning, Avalanche, timm) are imported only when a subcommand runs, so
``mneme --help`` answers at once.
"""

from __future__ import annotations

import sys
import warnings

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
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from callbacks import ContinualMetrics
    from datamodules import ContinualDataModule

    class MnemeCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ContinualMetrics, "metrics")
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
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] not in SUBCOMMANDS:
        sys.exit(f"mneme: unknown subcommand '{argv[0]}'; use one of {', '.join(SUBCOMMANDS)}")
    warnings.filterwarnings("ignore", message="no QP solver found")  # avalanche's import
    build_cli(args)


if __name__ == "__main__":
    main()
