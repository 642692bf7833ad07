"""The ``mneme`` command: a LightningCLI over Mneme's modules, datamodule and callbacks.

Heavy libraries (Lightning, Avalanche, timm) are imported only when a subcommand runs, so
``mneme --help`` answers at once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
import warnings
from pathlib import Path

from mneme.app.cpu_threads import prefer_passive_openmp_wait
from mneme.app.lazy_imports import defer_unused_imports
from mneme.datamodules.errors import ConfigError, MnemeError

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
SELF_LOADING = ("mneme.app.FewShotEvaluator", "mneme.app.fewshot_eval.FewShotEvaluator")


# The trainer arguments the experience schedule decides or checks (datamodules/schedule.py).
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
# Subcommands that evaluate a trained model: without a checkpoint they would score random
# weights and exit 0.
EVALUATING = ("validate", "test", "predict")
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
    from mneme.app.cpu_threads import CPU_THREADS_HELP, apply_cpu_threads
    from mneme.app.errors import summarize_argument_error
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


def logger_args(trainer_config) -> dict | None:
    """``init_args`` of a logger that writes ``<save_dir>/<name>/<version>`` (TensorBoard,
    CSV), or ``None``."""
    logger = trainer_config.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if len(logger) == 1 else None
    if logger is None or isinstance(logger, bool) or not hasattr(logger, "get"):
        return None
    init_args = logger.get("init_args")
    if init_args is None or "save_dir" not in init_args or "version" not in init_args:
        return None
    return init_args


def log_root(trainer_config) -> Path | None:
    args = logger_args(trainer_config)
    return None if args is None else Path(args["save_dir"]) / (args.get("name") or "")


def version_folder(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


# Log folders this process claimed and has not written into yet (removed if it fails).
CLAIMED: list[Path] = []


def claim_log_version(trainer_config) -> None:
    """Create the run's log folder with ``os.mkdir``, which fails if it exists, so that two
    runs started together on one logs folder never share a version, and an earlier run's
    folder (``trainer.logger.init_args.version``) is refused. Rank 0 claims; the other
    ranks take its folder from Lightning (``trainer.log_dir`` is broadcast)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    args, root = logger_args(trainer_config), log_root(trainer_config)
    if args is None or getattr(rank_zero_only, "rank", 0) != 0:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"trainer.logger.init_args.save_dir: cannot create '{root}' "
            f"({error.strerror or error}); choose a writable folder"
        ) from None
    if args["version"] is not None:
        folder = root / version_folder(args["version"])
        try:
            folder.mkdir()
        except FileExistsError:
            raise ConfigError(
                f"trainer.logger.init_args.version: '{folder}' holds an earlier run, which a "
                "new run never writes into; leave version unset for a new one (resume with "
                f"--ckpt_path {folder}/checkpoints/last.ckpt)"
            ) from None
        CLAIMED.append(folder)
        return
    numbers = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    version = max(numbers, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            break
        except FileExistsError:  # another run claimed it first: take the next
            version += 1
    args["version"] = version
    CLAIMED.append(root / f"version_{version}")


# A dataset folder the run would create (a benchmark's ``dataset_root`` that does not exist
# yet): removed, with the empty folders a failed download made in it, when the run fails.
NEW_DATA_FOLDERS: list[Path] = []


def note_new_folder(benchmark_args) -> None:
    root = benchmark_args.get("dataset_root") if hasattr(benchmark_args, "get") else None
    if isinstance(root, str) and root and not Path(root).exists():
        NEW_DATA_FOLDERS.append(Path(root))


def remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` if it and every folder below it hold no file."""
    if not folder.is_dir() or any(p.is_file() for p in folder.rglob("*")):
        return
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir()
    folder.rmdir()


def release_claims() -> None:
    """Remove the log folders this process claimed and left empty (a run that failed)."""
    for folder in CLAIMED:
        try:
            folder.rmdir()  # only if empty: never a folder that holds anything
        except OSError:
            pass
    CLAIMED.clear()
    for folder in NEW_DATA_FOLDERS:
        remove_empty_tree(folder)
    NEW_DATA_FOLDERS.clear()


def check_weight_files(init_args) -> None:
    """Refuse a model weights file (``model.encoder_weights``, ...) that does not exist:
    timm's loader raises ``FileNotFoundError`` without naming it."""
    from mneme.app.backbones import resolve_weights_path

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
    prefer_passive_openmp_wait()
    defer_unused_imports()
    if argv[0] == "export":  # imports torch/onnx only when asked
        from mneme.app.export import main as export_main

        quiet_known_noise()
        try:
            export_main(argv[1:])
        finally:
            release_claims()
        return
    if argv[0] == "tune":  # imports optuna only when asked
        quiet_known_noise()
        from mneme.app.tune import main as tune_main

        try:
            tune_main(argv[1:])
        finally:
            release_claims()
        return
    fewshot = argv[0] == FEWSHOT
    if fewshot:
        argv = argv[1:]
        if not argv or argv[0] not in SUBCOMMANDS[:3]:
            sys.exit("mneme: error: use `mneme fewshot {fit,validate,test} --config X.yaml`")
    elif argv[0] not in SUBCOMMANDS:
        sys.exit(
            f"mneme: error: unknown subcommand '{argv[0]}'; use one of "
            f"{', '.join(SUBCOMMANDS)}, {FEWSHOT}, export, tune"
        )
    quiet_known_noise()
    try:
        run_cli(argv, fewshot)
    except RunInterrupted as error:
        rank_zero_error(str(error))
        sys.exit(error.status)
    finally:
        release_claims()


def run_cli(args: list[str] | None, fewshot: bool = False) -> None:
    """``build_cli`` with the user's errors as one line (``MNEME_DEBUG=1``: tracebacks)."""
    if debug_mode():
        build_cli(args, fewshot=fewshot)
        return
    try:
        build_cli(args, fewshot=fewshot)
    except RunInterrupted:
        raise
    except MnemeError as error:
        sys.exit(f"mneme: error: {error}")
    except KeyboardInterrupt:  # before or after the trainer's own handling
        sys.exit(f"mneme: error: interrupted (Ctrl-C); status {INTERRUPT_STATUS['SIGINT']}")
    except Exception as error:
        from mneme.app.errors import summarize_library_error

        summary = summarize_library_error(error)
        if summary is None:
            raise  # not an error of the user's input: a bug, with its traceback
        sys.exit(f"mneme: error: {summary} (MNEME_DEBUG=1 shows the traceback)")


def debug_mode() -> bool:
    """``MNEME_DEBUG`` on: 1, true or yes (any case); 0, false, no or empty leave it off."""
    return os.environ.get("MNEME_DEBUG", "").strip().lower() in ("1", "true", "yes")


def rank_zero_error(message: str) -> None:
    """The one error line, printed once under DDP (by rank 0)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"mneme: error: {message}", file=sys.stderr, flush=True)


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
    # batch norms of a frozen backbone stay in eval mode on purpose (their statistics are the
    # pretrained ones: mneme.app.adaptation.freeze_norm_statistics)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # `mneme fewshot fit ...` hands LightningCLI the arguments after `fewshot`, on purpose
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertising())


class _NoAdvertising:
    """Drops Lightning's tip to install its cloud logger."""

    @staticmethod
    def filter(record) -> bool:
        return "litlogger" not in record.getMessage()


def console_main() -> None:
    """The ``mneme`` command: ``main``, then the process ends without the interpreter's
    teardown. Freeing the objects of torch, Lightning and their 4,000 modules one by one
    takes about 2 s on the 2-core machine (longer than the quickstart trains), and a finished
    run needs none of it: the exit handlers (logging, DataLoader workers) still run and the
    output is flushed, as mypy ends its command. With a thread of the run's still working
    (not a daemon), the exit is an ordinary one. Tests call ``main`` instead."""
    try:
        main()
        status = 0
    except SystemExit as exit_:  # reported as the interpreter reports an uncaught one
        status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        sys.exit(status)
    atexit._run_exitfuncs()  # what a normal exit runs first (CPython's own, unlisted)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a reader that has gone (`| head`)
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    console_main()
