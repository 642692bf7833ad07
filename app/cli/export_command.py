"""``mneme export``'s command line: its options, the config's LightningCLI (for the module
class, datamodule and callbacks), the checkpoint's checks; the export itself is
:mod:`mneme.app.compress.export`.

    mneme export --config configs/quickstart.yaml \\
        --ckpt_path logs/quickstart/version_0/checkpoints/last.ckpt --format onnx \\
        [--output model.onnx] [--quantize {config,none,ptq_dynamic,ptq_weight_only,ptq_static,qat}]
        [--tower image|text|audio]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mneme.app.cli.checks import check_checkpoint, check_checkpoint_model
from mneme.app.cli.parser import build_cli
from mneme.app.core.errors import ConfigError

HF_FORMAT = "huggingface"  # a ContinualLM checkpoint as a save_pretrained folder
USAGE = (
    "usage: mneme export --config CONFIG.yaml --ckpt_path CKPT --format {torch.export,onnx} "
    "[--output PATH] [--quantize {config,none,ptq_dynamic,ptq_weight_only,ptq_static,qat}] "
    "[--tower MODALITY]"
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The export options; the rest (``--config``, overrides) goes to the CLI's parser."""
    from mneme.app.compress.export import check_request

    parser = argparse.ArgumentParser(
        prog="mneme export", usage=USAGE.removeprefix("usage: "), add_help=True
    )
    parser.add_argument("--ckpt_path", required=False)
    parser.add_argument("--format", default="torch.export")
    parser.add_argument("--output", default=None)
    parser.add_argument("--quantize", default="config")
    parser.add_argument("--tower", default=None)
    options, rest = parser.parse_known_args(argv)
    if options.format != HF_FORMAT:  # a language model's folder: mneme.app.compress.hf_export
        check_request(options.format, options.quantize)
    if not options.ckpt_path:
        raise ConfigError("--ckpt_path: `mneme export` exports a trained model; pass its .ckpt")
    return options, rest


def configured(config_args: list[str], ckpt: Path) -> Any:
    """The config's LightningCLI (not run), after the checkpoint's checks: a readable,
    weights-only file of the config's module class."""
    checkpoint = check_checkpoint(str(ckpt))
    cli = build_cli(config_args + ["--trainer.logger", "false"], run=False)
    check_checkpoint_model(checkpoint, cli.config["model"]["class_path"])
    del checkpoint
    return cli


def load_model(config_args: list[str], ckpt_path: Path) -> tuple[Any, Any]:
    """The checkpoint's module, as the export loads it (before it is made plain), and the
    config's CLI."""
    from mneme.app.compress.export import load_trained

    cli = configured(config_args, Path(ckpt_path))
    return load_trained(type(cli.model), Path(ckpt_path)), cli


def export(
    config_args: list[str],
    ckpt_path: str,
    fmt: str,
    output: str | None = None,
    quantize: str = "config",
    tower: str | None = None,
) -> tuple[Path, Path]:
    """Export the checkpoint's model (or an aligner's ``tower``); returns the artifact's and
    its sidecar's paths."""
    from mneme.app.compress.export import check_request, export_model, output_paths

    if fmt == HF_FORMAT:  # ContinualLM: a Hugging Face folder (the checkpoint is self-contained)
        from mneme.app.compress.hf_export import export_checkpoint

        folder = export_checkpoint(ckpt_path, output or Path(ckpt_path).with_suffix(".hf"))
        return folder, folder / "config.json"
    check_request(fmt, quantize)  # before anything loads
    ckpt = Path(ckpt_path)
    out, side = output_paths(ckpt, output, fmt)
    cli = configured(config_args, ckpt)
    callbacks = list(getattr(cli.trainer, "callbacks", []))
    return export_model(
        type(cli.model), ckpt, fmt, out, side, quantize, tower, cli.datamodule, callbacks
    )


def main(argv: list[str]) -> None:
    """``mneme export ...``: one line on the user's errors, the written paths on success."""
    from mneme.app.cli.error_mode import debug_mode

    try:
        options, rest = parse_args(argv)
        out, side = export(
            rest,
            options.ckpt_path,
            options.format,
            options.output,
            options.quantize,
            options.tower,
        )
    except ConfigError as error:
        if debug_mode():
            raise
        sys.exit(f"mneme: error: {error}")
    print(f"exported {out} (preprocessing: {side})")
