"""What the ``mneme`` command knows without Lightning: its usage, subcommands and exit
statuses, and the helpers its LightningCLI calls (each imports a heavy library, if any, only
inside itself), so that ``mneme --help`` stays light."""

from __future__ import annotations

import re
from pathlib import Path

from mneme.app.cli.ddp_exit import DDP_TIMEOUT_S
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
