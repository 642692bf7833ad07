"""The LightningCLI parser of a subcommand, and what it knows of option names."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from mneme.app.cli.checks import (
    check_checkpoint,
    check_checkpoint_dirpath,
    check_checkpoint_model,
    check_weight_files,
    resolve_ckpt_path,
    trainer_setting_error,
)
from mneme.app.cli.ddp_exit import DDP_TIMEOUT_S
from mneme.app.cli.option_keys import record as record_option_keys
from mneme.app.cli.raw_config import check_raw_config, import_policy
from mneme.app.cli.run_checks import check_finite_weights, check_seed, check_state_keys
from mneme.app.cli.run_folders import (
    claim_log_version,
    files_in,
    note_new_folder,
    written_since,
)
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
  predict    write what a checkpoint predicts (the test stream, or --data.predict_inputs:
             a folder or CSV of images) to <run>/eval/predict-<n>/predictions.jsonl
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


class RunInterrupted(MnemeError):
    """A run stopped by a signal before its end: not a success, and resumable."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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
    from typing import Literal, Union

    from jsonargparse import ArgumentError, Namespace
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
        PredictionWriter,
        StreamProgressBar,
    )
    from mneme.datamodules import ContinualDataModule, EpisodicDataModule

    parsed = isinstance(args, Namespace)  # a configuration this parser made, not text
    asked = [args["subcommand"]] if parsed else (args if args is not None else sys.argv[1:])[:1]
    command_name = " ".join([FEWSHOT] * fewshot + asked)  # as option_keys records it

    class _Parsed(Exception):  # noqa: N818 - carries the configuration out, not an error
        def __init__(self, config: Namespace) -> None:
            self.config = config

    class MnemeCLI(LightningCLI):
        def subcommands(self) -> dict[str, set[str]]:
            # The parser of the asked subcommand only: LightningCLI builds one for each of
            # the four, from every class's signature (70 failing in-process runs of the
            # bad-input catalog: 26.3 s with all four, 18.9 s with one).
            every = LightningCLI.subcommands()
            return {name: skip for name, skip in every.items() if name in asked} or every

        def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            if subcommand in ("validate", "test"):
                # Mneme's metrics callbacks print the results as tables of their own;
                # Lightning's would repeat each figure under every DataLoader's column
                # (`--verbose true` brings it back).
                parser.set_defaults(verbose=False)
            return parser

        def parse_arguments(self, parser, args) -> None:
            if not parsed:  # a Namespace's text was checked when it was parsed
                check_config_files(args if args is not None else sys.argv[1:])
                # class paths judged as text before jsonargparse imports them; duplicated keys
                check_raw_config(args if args is not None else sys.argv[1:])
            try:
                with import_policy():  # and jsonargparse imports nothing outside the trusted
                    super().parse_arguments(parser, args)
            except ArgumentError as error:
                message = str(error).replace(
                    "Problems parsing config:", "invalid YAML in --config:"
                )
                keys = known_keys(parser, message)
                record_option_keys(command_name, keys)
                raise ConfigError(summarize_argument_error(message, keys)) from None
            if not parsed:  # for the early check of the next command's options
                record_option_keys(command_name, known_keys(parser, ""))
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
            if parse_only:
                raise _Parsed(self.config)
            # The run's log folder is claimed before anything is built, so that no two runs
            # (nor a run and an earlier one) ever share it.
            config = self.config[self.subcommand] if self.subcommand else self.config
            apply_cpu_threads(config.get("cpu_threads", "auto"))
            command = self.subcommand or "fit"
            self.run_folder = claim_log_version(
                config["trainer"],
                f"{FEWSHOT}-{command}" if fewshot else command,
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
            if fewshot:
                parser.add_lightning_class_args(FewShotMetrics, "fewshot_metrics")
                return
            if asked == ["predict"]:
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
            callbacks += list(extra_callbacks)
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
                if fewshot and subcommand == "fit" and not self.trainer.interrupted:
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

    try:
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
    except _Parsed as done:
        return done.config


def evaluated_checkpoint(config) -> str | None:
    """The checkpoint a command starts from: ``ckpt_path``, or the self-loading few-shot
    evaluator's ``model.init_args.checkpoint``."""
    model = config.get("model") or {}
    if model.get("class_path") in SELF_LOADING:
        return (model.get("init_args") or {}).get("checkpoint")
    return config.get("ckpt_path")


def rank_zero_say(line: str) -> None:
    """Print ``line`` on stdout, once under DDP (rank 0)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(line, flush=True)


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


def ddp_with_timeout(strategy, model=None):
    """A DDP strategy named by a string, built with a collective timeout
    (``MNEME_DDP_TIMEOUT`` seconds), so that a frozen rank ends the run instead of leaving
    the others waiting; ``None`` for any other strategy (kept as the user gave it). A model
    whose steps leave parameters without a gradient (a mixture-of-experts head runs only
    the top_k experts of each sample) gets DDP's unused-parameter detection, which plain
    ``ddp`` lacks (its reducer would stop the run), unless the name turns it off."""
    if not isinstance(strategy, str) or not strategy.startswith("ddp"):
        return None
    import inspect
    from datetime import timedelta

    from lightning.pytorch.strategies import StrategyRegistry

    entry = StrategyRegistry[strategy] if strategy in StrategyRegistry else None
    if not entry or "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return None
    params = dict(entry["init_params"])
    if "find_unused_parameters" not in params and leaves_parameters_unused(model):
        params["find_unused_parameters"] = True
        rank_zero_say(f"mneme: trainer.strategy {strategy}: with unused-parameter detection (MoE)")
    return entry["strategy"](**params, timeout=timedelta(seconds=DDP_TIMEOUT_S))


def leaves_parameters_unused(model) -> bool:
    """Whether a training step of ``model`` may leave parameters without a gradient: a
    routed head (``model.head: {name: moe}``, role ``routed`` in the head registry), read
    from the hyperparameters since the head is built only in ``setup``."""
    from mneme.app.nn.heads.registry import HEADS

    head = dict(getattr(model, "hparams", None) or {}).get("head")
    kind = HEADS.get(str(head.get("name"))) if isinstance(head, dict) else None
    return kind is not None and kind.role == "routed"


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
