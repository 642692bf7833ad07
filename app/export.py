"""``mneme export``: a trained classifier as a ``torch.export`` program (``.pt2``) or an ONNX
graph, with a JSON sidecar describing its preprocessing.

    mneme export --config configs/quickstart.yaml \\
        --ckpt_path logs/quickstart/version_0/checkpoints/last.ckpt --format onnx \\
        [--output model.onnx]

The exported model is the checkpoint's, made plain first: LoRA updates folded into the base
weights (peft's ``LoraLayer.merge``, the layer replaced by its base layer) and pruning
re-parametrizations made permanent (``torch.nn.utils.prune.remove``). It maps a batch of
inputs (the sidecar's ``input_key``, ``shape`` with a dynamic batch dimension, ``dtype``,
already standardized with ``normalization`` mean/std as the stream did) to class logits in
the order of ``classes``. onnx/onnxscript are imported only here (``mneme --help`` stays fast).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from mneme.datamodules.errors import ConfigError

FORMATS = ("torch.export", "onnx")
SUFFIX = {"torch.export": ".pt2", "onnx": ".onnx"}

USAGE = (
    "usage: mneme export --config CONFIG.yaml --ckpt_path CKPT --format {torch.export,onnx} "
    "[--output PATH]"
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The export options; the rest (``--config``, overrides) goes to the CLI's parser."""
    parser = argparse.ArgumentParser(prog="mneme export", usage=USAGE, add_help=True)
    parser.add_argument("--ckpt_path", required=False)
    parser.add_argument("--format", default="torch.export")
    parser.add_argument("--output", default=None)
    options, rest = parser.parse_known_args(argv)
    if options.format not in FORMATS:
        raise ConfigError(
            f"--format: unknown format {options.format!r}; use one of {', '.join(FORMATS)}"
        )
    if not options.ckpt_path:
        raise ConfigError("--ckpt_path: `mneme export` exports a trained model; pass its .ckpt")
    return options, rest


def merge_lora(model: Any) -> int:
    """Fold every peft LoRA layer of ``model`` into its base layer and put the base layer in
    its place (what peft's ``merge_and_unload`` does for a ``PeftModel``; Mneme injects LoRA
    into a plain backbone, which has no such method). Returns how many layers were merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no LoRA layer either
        return 0
    merged = 0
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, LoraLayer) or not name:
            continue
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
        merged += 1
    return merged


def remove_pruning(model: Any) -> int:
    """Make every ``torch.nn.utils.prune`` mask permanent (``weight = weight_orig * mask``)."""
    from torch.nn.utils import prune

    removed = 0
    for module in model.modules():
        if not prune.is_pruned(module):
            continue
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
                removed += 1
    return removed


def logits_module(model: Any):
    """``x -> logits`` of a single-head classifier, as a plain ``nn.Module``."""
    from torch import nn

    class _Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    return _Logits(model).eval()


def export_program(module: Any, example: Any, fmt: str, output: Path) -> None:
    """Write ``module`` (``x -> logits``) in ``fmt`` with a dynamic batch dimension; a model
    that ``torch.export`` cannot trace (data-dependent control flow) ends in a ConfigError
    naming the module."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    dynamic = {"x": {0: batch}}
    try:
        if fmt == "torch.export":
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
            torch.export.save(program, str(output))
        else:
            torch.onnx.export(
                module,
                (example,),
                str(output),
                input_names=["x"],
                output_names=["logits"],
                dynamic_shapes=dynamic,
                dynamo=True,
                verbose=False,
            )
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - torch raises many types for untraceable code
        text = " ".join(str(error).split())
        inner = type(module.inner).__name__ if hasattr(module, "inner") else "model"
        culprit = _culprit(module, error) or inner
        raise ConfigError(
            f"--format {fmt}: torch.export cannot trace {culprit} ({type(error).__name__}: "
            f"{text[:200]}); replace data-dependent Python branches (`if x.sum() > 0`) in its "
            "forward with torch.cond / torch.where, or export another format"
        ) from None


def _culprit(module: Any, error: BaseException) -> str | None:
    """The submodule whose ``forward`` was running when torch gave up: the innermost frame
    of the error's traceback (or of the errors it wraps) whose ``self`` is one of
    ``module``'s submodules, as ``name (Class)``. torch's message names only the expression."""
    import traceback

    names = {id(m): n for n, m in module.named_modules() if n}
    found = None
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame, _ in traceback.walk_tb(error.__traceback__):
            owner = frame.f_locals.get("self")
            if id(owner) in names:
                found = f"{names[id(owner)].removeprefix('inner.')} ({type(owner).__name__})"
        error = error.__cause__ or error.__context__
    return found


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(model: Any, datamodule: Any, ckpt_path: Path, fmt: str) -> dict[str, Any]:
    """What a consumer of the exported model needs to feed it and read its outputs."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        mneme_version = version("mneme")
    except PackageNotFoundError:
        mneme_version = "unknown"
    hp = model.hparams
    norm = hp.get("input_normalization")
    names = None
    try:
        names = datamodule.class_names if datamodule is not None else None
    except Exception:  # noqa: BLE001 - a stream that cannot be built here has no names
        names = None
    num_classes = int(hp["num_classes"])
    return {
        "format": fmt,
        "input_key": model.input_key,
        "input_name": "x",
        "output_name": "logits",
        "shape": ["batch", *[int(s) for s in hp["input_shape"]]],
        "dtype": "float32",
        "normalization": None if norm is None else {"mean": norm[0], "std": norm[1]},
        # logits column i is class i (labels are the stream's class ids, 0..num_classes-1)
        "class_order": list(range(num_classes)),
        "classes": names if names is not None else [str(i) for i in range(num_classes)],
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": sha256(ckpt_path),
        "mneme_version": mneme_version,
        "torch_version": torch.__version__,
    }


def load_model(config_args: list[str], ckpt_path: Path):
    """The config's module (and datamodule) with the checkpoint's weights, on the CPU."""
    import torch
    from mneme.app.cli import build_cli, check_checkpoint, check_checkpoint_model

    checkpoint = check_checkpoint(str(ckpt_path))
    cli = build_cli(config_args + ["--trainer.logger", "false"], run=False)
    cls = type(cli.model)
    check_checkpoint_model(checkpoint, cli.config["model"]["class_path"])
    hparams = {
        k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")
    }
    if not {"num_classes", "input_shape"} <= set(hparams):
        raise ConfigError(
            f"ckpt_path: '{ckpt_path}' holds no num_classes/input_shape hyperparameters; "
            "export a checkpoint of a ContinualClassifier"
        )
    model = cls(**hparams)
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    del checkpoint
    torch.set_grad_enabled(False)
    return model.cpu().eval(), cli.datamodule


def check_single_head(model: Any) -> None:
    if getattr(model, "num_heads", 1) != 1:
        raise ConfigError(
            "model.multi_head: a multi-head model needs its task id at each call, which the "
            "exported program does not take; export a single-head model (multi_head: false)"
        )


def export(
    config_args: list[str], ckpt_path: str, fmt: str, output: str | None = None
) -> tuple[Path, Path]:
    """Export the checkpoint's model; returns the artifact's path and its sidecar's."""
    import torch

    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    ckpt = Path(ckpt_path)
    model, datamodule = load_model(config_args, ckpt)
    check_single_head(model)
    merge_lora(model)
    remove_pruning(model)
    out = Path(output) if output else ckpt.with_suffix(SUFFIX[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, *model.hparams["input_shape"])
    export_program(logits_module(model), example, fmt, out)
    side = out.with_name(out.name + ".json")
    side.write_text(json.dumps(sidecar(model, datamodule, ckpt, fmt), indent=2) + "\n")
    return out, side


def main(argv: list[str]) -> None:
    """``mneme export ...``: one line on the user's errors, the written paths on success."""
    from mneme.app.cli import debug_mode

    try:
        options, rest = parse_args(argv)
        out, side = export(rest, options.ckpt_path, options.format, options.output)
    except ConfigError as error:
        if debug_mode():
            raise
        sys.exit(f"mneme: error: {error}")
    print(f"exported {out} (preprocessing: {side})")
