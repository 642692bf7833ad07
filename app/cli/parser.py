"""The LightningCLI parser of a subcommand, and what it knows of option names."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from mneme.app.cli.checks import (
    check_checkpoint,
    check_checkpoint_dirpath,
    check_checkpoint_model,
    check_weight_files,
    resolve_ckpt_path,
    trainer_setting_error,
)
from mneme.app.cli.run_folders import claim_log_version, note_new_folder
from mneme.app.core.errors import ConfigError, MnemeError

USAGE = """usage: mneme {fit,validate,test,predict} --config CONFIG.yaml [options]
       mneme fewshot {fit,validate,test} --config CONFIG.yaml [options]
       mneme export --config CONFIG.yaml --ckpt_path CKPT --format {torch.export,onnx}
       mneme tune --config CONFIG.yaml --search SEARCH.yaml --trials N [--study_dir DIR]

Continual and multimodal learning on PyTorch Lightning.

subcommands:
  fit        train over the whole stream of experiences
  validate   evaluate on every test experience
  test       evaluate a checkpoint (--ckpt_path) on the whole test stream
  predict    predict on the test stream
  fewshot    the same over N-way K-shot episodes (data: EpisodicDataModule): meta-train
             (ProtoNet, MAML), or few-shot evaluation of a trained checkpoint
             (FewShotEvaluator, whose own `checkpoint:` needs no --ckpt_path)
  export     write a trained classifier as a torch.export program (.pt2) or ONNX, with
             a JSON sidecar of its preprocessing (LoRA merged, pruning made permanent)
  tune       hyperparameter search over any config key with Optuna (one `fit` per
             trial, pruned at experience ends; the study in SQLite, resumable)

`mneme fit --help` lists every option; `mneme fit --config configs/quickstart.yaml
--print_config` prints the full configuration.
"""

SUBCOMMANDS = ("fit", "validate", "test", "predict")
FEWSHOT = "fewshot"
# Few-shot modules that load their trained model themselves (an init argument).
SELF_LOADING = ("mneme.app.FewShotEvaluator", "mneme.app.models.fewshot.evaluator.FewShotEvaluator")


# The trainer arguments the experience schedule decides or checks (app/core/schedule.py).
SCHEDULE_KEYS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "max_time",
    "fast_dev_run",
    "overfit_batches",
    "limit_train_batches",
    "limit_val_batches",
    "val_check_interval",
    "accumulate_grad_batches",
    "reload_dataloaders_every_n_epochs",
    "check_val_every_n_epoch",
    "num_sanity_val_steps",
)
# Exit statuses of an interrupted run, as a shell reports a process ended by the signal.
INTERRUPT_STATUS = {"SIGTERM": 143, "SIGINT": 130}
# Collective timeout of the DDP strategies the CLI builds (a frozen rank ends the run).
DDP_TIMEOUT_S = int(os.environ.get("MNEME_DDP_TIMEOUT", "600"))


class RunInterrupted(MnemeError):
    """A run stopped by a signal before its end: not a success, and resumable."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def build_cli(
    args: list[str] | None = None, run: bool = True, fewshot: bool = False, extra_callbacks=()
):
    """Build (and by default run) the LightningCLI; ``run=False`` only instantiates.
    ``fewshot``: episodes (``EpisodicDataModule``) and the few-shot report instead of a
    stream of experiences and its accuracy matrix. ``extra_callbacks``: live callbacks added
    to the trainer's (``mneme tune``'s pruning, which holds an Optuna trial)."""
    from typing import Literal, Union

    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI
    from mneme.app.cli.messages import summarize_argument_error
    from mneme.app.core.threads import CPU_THREADS_HELP, apply_cpu_threads
    from mneme.callbacks import (
        AutoCpuThreads,
        ContinualMetrics,
        ExperienceCheckpoint,
        ExperienceCost,
        FewShotMetrics,
        FiniteLossGuard,
        StreamProgressBar,
    )
    from mneme.datamodules import ContinualDataModule, EpisodicDataModule

    class MnemeCLI(LightningCLI):
        def subcommands(self) -> dict[str, set[str]]:
            # The parser of the asked subcommand only: LightningCLI builds one for each of
            # the four, from every class's signature (70 failing in-process runs of the
            # bad-input catalog: 26.3 s with all four, 18.9 s with one).
            every = LightningCLI.subcommands()
            asked = (args if args is not None else sys.argv[1:])[:1]
            return {name: skip for name, skip in every.items() if name in asked} or every

        def parse_arguments(self, parser, args) -> None:
            check_config_files(args if args is not None else sys.argv[1:])
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
                self_loading = config["model"]["class_path"] in SELF_LOADING
                if not self_loading:
                    config["ckpt_path"] = resolve_ckpt_path(subcommand, config)
                checkpoint = check_checkpoint(config.get("ckpt_path"))
                check_checkpoint_model(checkpoint, config["model"]["class_path"])
                check_checkpoint_dirpath(subcommand, config)
                note_new_folder(config["data"].get("benchmark_args"))
                check_weight_files(config["model"].get("init_args"))

        def before_instantiate_classes(self) -> None:
            # The run's log folder is claimed before anything is built, so that no two runs
            # (nor a run and an earlier one) ever share it.
            config = self.config[self.subcommand] if self.subcommand else self.config
            apply_cpu_threads(config.get("cpu_threads", "auto"))
            claim_log_version(config["trainer"])

        def _parse_ckpt_path(self) -> None:
            # Lightning would merge the checkpoint's hyper_parameters into the config here,
            # and their `_class_path` would decide which module gets imported: a crafted
            # (yet weights_only-safe) checkpoint could import any installed module. The
            # config decides the run; parse_arguments checked that the checkpoint fits it.
            return

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--cpu_threads",
                type=Union[int, Literal["auto"]],  # noqa: UP007 - jsonargparse reads typing
                default="auto",
                help=CPU_THREADS_HELP,
            )
            if fewshot:
                parser.add_lightning_class_args(FewShotMetrics, "fewshot_metrics")
                return
            parser.add_lightning_class_args(ContinualMetrics, "metrics")
            parser.add_lightning_class_args(ExperienceCost, "cost")
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
            callbacks += list(extra_callbacks)
            if config.get("cpu_threads", "auto") == "auto":  # decided once the model is built
                callbacks.append(AutoCpuThreads())
            kwargs.update(enable_progress_bar=bool(show), callbacks=callbacks)
            if strategy := ddp_with_timeout(user["strategy"]):
                kwargs["strategy"] = strategy
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            try:
                return super().instantiate_trainer(**kwargs)
            except MisconfigurationException as error:  # Lightning's word for a bad setting
                raise ConfigError(trainer_setting_error(error, user)) from None

        def _run_subcommand(self, subcommand: str) -> None:
            # Lightning turns SIGTERM into SystemExit(None) (status 0) and Ctrl-C into
            # SystemExit(1), after marking the trainer interrupted: neither says the run
            # is unfinished, nor how to resume it.
            try:
                super()._run_subcommand(subcommand)
                if fewshot and subcommand == "fit" and not self.trainer.interrupted:
                    # meta-training ends on the held-out classes' episodes, as the field reports
                    self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            except (SystemExit, KeyboardInterrupt):
                if not self.trainer.interrupted:
                    raise
            if self.trainer.interrupted:
                raise interruption(self.trainer, subcommand)

    return MnemeCLI(
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


def known_keys(parser, message: str) -> list[str]:
    """Option names a misspelled key may have meant: each subcommand's options (from the
    public ``get_defaults()`` of its parser), and the arguments of the class the error is
    about (its class path is only in the message's text)."""
    import importlib
    import inspect

    # jsonargparse 4.53 has no public accessor for a parser's subcommand parsers: the
    # subcommands action (private attribute) holds them in argparse's ``choices``.
    action = getattr(parser, "_subcommands_action", None)
    keys: list[str] = []
    for sub in (getattr(action, "choices", None) or {"": parser}).values():
        try:
            keys += [k for k in sub.get_defaults().keys() if k != "help"]
        except Exception:  # noqa: BLE001 - suggestions are a courtesy; the error still shows
            continue
    for class_path in re.findall(r"class_path '([\w.]+)'", message):
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
            keys += list(inspect.signature(cls).parameters)
        except (ImportError, AttributeError, ValueError, TypeError):
            continue
    return keys


def check_config_files(args: list[str]) -> None:
    """Refuse a ``--config`` file that is empty or is not a mapping of options (a YAML list
    or scalar), which jsonargparse reports only as ``Unexpected config``."""
    import yaml

    paths = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in map(Path, paths):
        if not path.is_file():
            continue  # jsonargparse names the missing file
        try:
            content = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue  # jsonargparse reports invalid YAML with its line
        if content is None:
            raise ConfigError(
                f"--config {path}: the file is empty; write options such as `trainer:`, "
                "`model:`, `data:` in it, or drop it"
            )
        if not isinstance(content, dict):
            kind = "a list" if isinstance(content, list) else f"a {type(content).__name__}"
            raise ConfigError(
                f"--config {path}: holds {kind}, not a mapping of options; write it as "
                "`trainer: ...`, `model: ...`, `data: ...` (see configs/quickstart.yaml)"
            )


def ddp_with_timeout(strategy):
    """A DDP strategy named by a string, built with a collective timeout
    (``MNEME_DDP_TIMEOUT`` seconds), so that a frozen rank ends the run instead of leaving
    the others waiting; ``None`` for any other strategy (kept as the user gave it)."""
    if not isinstance(strategy, str) or not strategy.startswith("ddp"):
        return None
    import inspect
    from datetime import timedelta

    from lightning.pytorch.strategies import StrategyRegistry

    entry = StrategyRegistry[strategy] if strategy in StrategyRegistry else None
    if not entry or "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return None
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=DDP_TIMEOUT_S))


def interruption(trainer, subcommand: str) -> RunInterrupted:
    """What an interrupted run tells the user: which signal, how far it got, how to resume."""
    signal_name = "SIGTERM" if trainer.received_sigterm else "SIGINT"
    where = f"at epoch {trainer.current_epoch}"
    checkpoint = trainer.checkpoint_callback
    last = Path(checkpoint.dirpath) / "last.ckpt" if checkpoint and checkpoint.dirpath else None
    if subcommand != "fit":
        hint = "run it again"
    elif last is not None and last.is_file():
        hint = f"resume with the same command and --ckpt_path {last}"
    else:
        hint = "no checkpoint was saved yet: run it again from the start"
    return RunInterrupted(
        f"{subcommand} interrupted by {signal_name} {where}, before its end; {hint}",
        INTERRUPT_STATUS[signal_name],
    )
