"""``MnemeCLI``: the LightningCLI of a subcommand (``build_cli`` in
:mod:`mneme.app.cli.parser` builds it), with Mneme's checks before anything is built, its
run folder, trainer settings, callbacks, and the way an interrupted run ends."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from mneme.app.cli.checks import (
    check_checkpoint,
    check_checkpoint_dirpath,
    check_checkpoint_model,
    check_weight_files,
    resolve_ckpt_path,
    trainer_setting_error,
)
from mneme.app.cli.commands import (
    FEWSHOT,
    SCHEDULE_KEYS,
    SELF_LOADING,
    check_config_files,
    ddp_with_timeout,
    evaluated_checkpoint,
    interruption,
    known_keys,
    rank_zero_say,
)
from mneme.app.cli.messages import summarize_argument_error
from mneme.app.cli.option_keys import record as record_option_keys
from mneme.app.cli.raw_config import check_raw_config, import_policy
from mneme.app.cli.run_checks import check_finite_weights, check_seed, check_state_keys
from mneme.app.cli.run_folders import (
    claim_log_version,
    files_in,
    note_new_folder,
    written_since,
)
from mneme.app.core.errors import ConfigError
from mneme.app.core.threads import CPU_THREADS_HELP, apply_cpu_threads
from mneme.callbacks import (
    AutoCpuThreads,
    ContinualMetrics,
    ExperienceCheckpoint,
    ExperienceCost,
    FewShotMetrics,
    FiniteLossGuard,
    PredictionWriter,
    StreamProgressBar,
)


@dataclass(frozen=True)
class Request:
    """What one ``build_cli`` call asks of its ``MnemeCLI``."""

    asked: list[str]  # the subcommand asked for ([] when none is given)
    parsed: bool  # the args are a configuration this parser made, not text
    fewshot: bool  # episodes and the few-shot report instead of a stream of experiences
    parse_only: bool  # stop with the parsed configuration before anything is instantiated
    extra_callbacks: Sequence[Any]  # live callbacks added to the trainer's
    command_name: str  # as option_keys records it


class ParsedConfig(Exception):  # noqa: N818 - carries the configuration out, not an error
    def __init__(self, config: Namespace) -> None:
        self.config = config


class MnemeCLI(LightningCLI):
    def __init__(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Stored first: LightningCLI parses (and runs) inside its __init__, which calls the
        # methods below.
        self.request = request
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        # The parser of the asked subcommand only: LightningCLI builds one for each of
        # the four, from every class's signature (70 failing in-process runs of the
        # bad-input catalog: 26.3 s with all four, 18.9 s with one).
        every = LightningCLI.subcommands()
        return {name: skip for name, skip in every.items() if name in self.request.asked} or every

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            # Mneme's metrics callbacks print the results as tables of their own;
            # Lightning's would repeat each figure under every DataLoader's column
            # (`--verbose true` brings it back).
            parser.set_defaults(verbose=False)
        return parser

    def parse_arguments(self, parser, args) -> None:
        if not self.request.parsed:  # a Namespace's text was checked when it was parsed
            check_config_files(args if args is not None else sys.argv[1:])
            # class paths judged as text before jsonargparse imports them; duplicated keys
            check_raw_config(args if args is not None else sys.argv[1:])
        try:
            with import_policy():  # and jsonargparse imports nothing outside the trusted
                super().parse_arguments(parser, args)
        except ArgumentError as error:
            message = str(error).replace("Problems parsing config:", "invalid YAML in --config:")
            keys = known_keys(parser, message)
            record_option_keys(self.request.command_name, keys)
            raise ConfigError(summarize_argument_error(message, keys)) from None
        if not self.request.parsed:  # for the early check of the next command's options
            record_option_keys(self.request.command_name, known_keys(parser, ""))
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            self_loading = config["model"]["class_path"] in SELF_LOADING
            if not self_loading:
                config["ckpt_path"] = resolve_ckpt_path(subcommand, config)
            checkpoint = check_checkpoint(config.get("ckpt_path"))
            check_finite_weights(checkpoint, config.get("ckpt_path"))
            check_seed(config.get("seed_everything"))
            check_checkpoint_model(checkpoint, config["model"]["class_path"])
            check_checkpoint_dirpath(subcommand, config)
            note_new_folder(config["data"].get("benchmark_args"))
            check_weight_files(config["model"].get("init_args"))

    def before_instantiate_classes(self) -> None:
        if self.request.parse_only:
            raise ParsedConfig(self.config)
        # The run's log folder is claimed before anything is built, so that no two runs
        # (nor a run and an earlier one) ever share it.
        config = self.config[self.subcommand] if self.subcommand else self.config
        apply_cpu_threads(config.get("cpu_threads", "auto"))
        command = self.subcommand or "fit"
        self.run_folder = claim_log_version(
            config["trainer"],
            f"{FEWSHOT}-{command}" if self.request.fewshot else command,
            evaluated_checkpoint(config),
        )
        if self.run_folder is not None:
            if self.run_folder.kind == "resumed":  # its config.yaml: the finishing run's
                # (decided on every rank: Lightning's check of the file is a collective)
                self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}
            self.files_before = files_in(self.run_folder.path)
            resumed = " (resumed)" if self.run_folder.kind == "resumed" else ""
            rank_zero_say(f"mneme: run folder {self.run_folder.path}{resumed}")
        if command == "predict" and config.get("return_predictions") is None:
            config["return_predictions"] = False  # PredictionWriter writes them per batch

    # A private LightningCLI method: see private_api.LIGHTNING_CLI_OVERRIDES (tested).
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
        if self.request.fewshot:
            parser.add_lightning_class_args(FewShotMetrics, "fewshot_metrics")
            return
        if self.request.asked == ["predict"]:
            parser.add_lightning_class_args(PredictionWriter, "predictions")
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
        elif not show:  # a line per experience (per N evaluation batches) instead
            from mneme.callbacks.reporting.progress import ProgressLines

            callbacks.append(ProgressLines())
        callbacks += list(self.request.extra_callbacks)
        if config.get("cpu_threads", "auto") == "auto":  # decided once the model is built
            callbacks.append(AutoCpuThreads())
        kwargs.update(enable_progress_bar=bool(show), callbacks=callbacks)
        check_state_keys(callbacks)
        if strategy := ddp_with_timeout(user["strategy"], self.model):
            kwargs["strategy"] = strategy
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:  # Lightning's word for a bad setting
            raise ConfigError(trainer_setting_error(error, user)) from None

    # A private LightningCLI method: see private_api.LIGHTNING_CLI_OVERRIDES (tested).
    def _run_subcommand(self, subcommand: str) -> None:
        # Lightning turns SIGTERM into SystemExit(None) (status 0) and Ctrl-C into
        # SystemExit(1), after marking the trainer interrupted: neither says the run
        # is unfinished, nor how to resume it.
        self.check_resume()  # before anything is written, for every subcommand
        try:
            super()._run_subcommand(subcommand)
            if self.request.fewshot and subcommand == "fit" and not self.trainer.interrupted:
                # meta-training ends on the held-out classes' episodes, as the field reports
                self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        except (SystemExit, KeyboardInterrupt):
            if not self.trainer.interrupted:
                raise
        finally:
            self.report_written()
        if self.trainer.interrupted:
            raise interruption(self.trainer, subcommand)

    def check_resume(self) -> None:
        """A resume that changes what defines the run (an evaluation: its stream) is
        refused here, before the command writes anything (its config, logs, metrics)
        into a run folder; the module's ``on_load_checkpoint`` checks it again for any
        other caller."""
        from mneme.app.models.run_definition import KEY, check_same_run, definition_of

        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        saved = (check_checkpoint(ckpt_path) or {}).get(KEY)
        if not isinstance(saved, dict) or not hasattr(self.datamodule, "run_definition"):
            return
        version = int(saved.get("version", 1))  # compared as that checkpoint recorded it
        current = definition_of(self.datamodule, self.trainer.callbacks, self.model, version)
        allowed = set(getattr(self.datamodule, "allow_resume_changes", ()))
        if self.subcommand != "fit":  # an evaluation needs only the same stream
            allowed |= {"strategies", "epochs_per_experience", "optimizer"}
        check_same_run(saved, current, allowed)

    def report_written(self) -> None:
        """One line naming the files this command wrote in its run folder."""
        claimed = getattr(self, "run_folder", None)
        if claimed is not None:
            written = written_since(claimed.path, self.files_before)
            if written:
                rank_zero_say(f"mneme: wrote {', '.join(written)} in {claimed.path}")
