"""The ``mneme`` command: a LightningCLI over Mneme's modules, datamodule and callbacks.

Heavy libraries (Lightning, Avalanche, timm) are imported only when a subcommand runs, so
``mneme --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
import warnings

from mneme.app.cli.commands import (
    FEWSHOT,
    INTERRUPT_STATUS,
    SUBCOMMANDS,
    USAGE,
    RunInterrupted,
)
from mneme.app.cli.ddp_exit import end_failed_ddp_run, in_ddp_run
from mneme.app.cli.error_mode import debug_mode, rank_zero_error
from mneme.app.cli.lazy_imports import defer_unused_imports
from mneme.app.cli.option_keys import first_unknown_option
from mneme.app.cli.parser import build_cli
from mneme.app.cli.run_folders import release_claims
from mneme.app.core.errors import MnemeError
from mneme.app.core.threads import prefer_passive_openmp_wait


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    prefer_passive_openmp_wait()
    defer_unused_imports()
    if argv[0] == "export":  # imports torch/onnx only when asked
        from mneme.app.cli.export_command import main as export_main

        quiet_known_noise()
        try:
            export_main(argv[1:])
        finally:
            release_claims()
        return
    if argv[0] == "tune":  # imports optuna only when asked
        quiet_known_noise()
        from mneme.app.cli.tune_command import main as tune_main

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
    early = first_unknown_option(" ".join([FEWSHOT] * fewshot + argv[:1]), argv[1:])
    if early and not debug_mode():  # before Lightning, Avalanche and timm are imported
        from mneme.app.cli.messages import unknown_option
        from mneme.app.cli.raw_config import check_raw_config

        try:  # its lines first: a field that moved is named with where it went
            check_raw_config(argv[1:])
        except MnemeError as error:
            sys.exit(f"mneme: error: {error}")
        sys.exit(f"mneme: error: {unknown_option(*early)}")
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
        from mneme.app.cli.messages import summarize_library_error

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
    # batch norms of a frozen backbone stay in eval mode on purpose (their statistics are the
    # pretrained ones: mneme.app.finetuning.adaptation.freeze_norm_statistics)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # PredictionWriter numbers the samples itself (Mneme's loaders are not DataLoaders with
    # Lightning's batch-sampler wrapper): the batch indices Lightning looks for are not used
    warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched")
    # `mneme fewshot fit ...` hands LightningCLI the arguments after `fewshot`, on purpose
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertising())
    # torchao's import registers its KernelPreference enum with torch's pytree, which torch
    # 2.14 logs as deprecated (a warning per import, on every QAT run and export)
    logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())


class _NoAdvertising:
    """Drops Lightning's tips to install its cloud logger and model registry."""

    @staticmethod
    def filter(record) -> bool:
        message = record.getMessage()
        return "litlogger" not in message and "litmodels" not in message


class _TorchaoEnumNotice:
    """Drops torch's notice about torchao's ``KernelPreference`` enum (torchao's to fix)."""

    @staticmethod
    def filter(record) -> bool:
        return "'KernelPreference'> is an Enum subclass" not in record.getMessage()


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
    except Exception:  # a bug: its traceback, and in a DDP run no process left waiting
        if not in_ddp_run():
            raise
        traceback.print_exc()
        status = 1
    if status:  # a failed DDP process ends the run's other processes and exits at once
        end_failed_ddp_run(status)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        sys.exit(status)
    from mneme.app.core.private_api import run_exit_handlers

    run_exit_handlers()  # what a normal exit runs first
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a reader that has gone (`| head`)
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    console_main()
