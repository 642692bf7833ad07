"""``mneme export``: a trained classifier (or one tower of an aligner) as a ``torch.export``
program (``.pt2``) or an ONNX graph, with a JSON sidecar describing its preprocessing.

    mneme export --config configs/quickstart.yaml \\
        --ckpt_path logs/quickstart/version_0/checkpoints/last.ckpt --format onnx \\
        [--output model.onnx] [--quantize {config,none,ptq_dynamic,ptq_weight_only,ptq_static,qat}]
        [--tower image|text|audio]

The exported model is the checkpoint's, made plain first: LoRA updates folded into the base
weights (peft's ``LoraLayer.merge``, the layer replaced by its base layer) and pruning
re-parametrizations made permanent (``torch.nn.utils.prune.remove``). It maps a batch of
inputs (the sidecar's ``input_key``, ``shape`` with a dynamic batch dimension, ``dtype``,
already standardized with ``normalization`` mean/std as the stream did) to class logits in
the order of ``classes``. onnx/onnxscript are imported only here (``mneme --help`` stays fast).

A :class:`~mneme.app.ContrastiveAligner` exports one tower at a time (``--tower``): its
``ModalityEncoder``, inputs of that modality (the stream's dtype: token ids for text) to the
L2-normalized embedding; the sidecar adds the tokenizer for a text tower.

Quantization (``--quantize``; default ``config``: the mode, ``exclude`` and ``encoders`` of the
config's :class:`~mneme.callbacks.Quantization` callback, float without one; ``none``: float):

- ``torch.export``: torchao int8 (:func:`~.quantize.quantize_model`, every mode; the
  program keeps torchao's int8 ops, so loading it needs ``import torchao`` first);
  ``ptq_static`` calibrates on ``calibration_batches`` batches of the training stream.
- ``onnx``: the ONNX exporter has no translation of torchao's int8 matmul (``aten._int_mm``,
  the ``ptq_dynamic``/``ptq_static`` kernels) and folds ``ptq_weight_only`` weights back to
  float32, so ONNX int8 is onnxruntime's own: the float graph, then
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights per tensor, uint8 activations
  quantized at run time; ``MatMulInteger``), for ``ptq_dynamic`` and ``qat``; the other modes
  are refused in one line naming the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError

FORMATS = ("torch.export", "onnx")
SUFFIX = {"torch.export": ".pt2", "onnx": ".onnx"}
QUANTIZE = ("config", "none", "ptq_dynamic", "ptq_weight_only", "ptq_static", "qat")
ONNX_QUANTIZE = ("ptq_dynamic", "qat")  # through onnxruntime.quantization.quantize_dynamic

USAGE = (
    "usage: mneme export --config CONFIG.yaml --ckpt_path CKPT --format {torch.export,onnx} "
    "[--output PATH] [--quantize {config,none,ptq_dynamic,ptq_weight_only,ptq_static,qat}] "
    "[--tower MODALITY]"
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The export options; the rest (``--config``, overrides) goes to the CLI's parser."""
    parser = argparse.ArgumentParser(prog="mneme export", usage=USAGE, add_help=True)
    parser.add_argument("--ckpt_path", required=False)
    parser.add_argument("--format", default="torch.export")
    parser.add_argument("--output", default=None)
    parser.add_argument("--quantize", default="config")
    parser.add_argument("--tower", default=None)
    options, rest = parser.parse_known_args(argv)
    if options.format not in FORMATS:
        raise ConfigError(
            f"--format: unknown format {options.format!r}; use one of {', '.join(FORMATS)}"
        )
    if options.quantize not in QUANTIZE:
        raise ConfigError(
            f"--quantize: unknown mode {options.quantize!r}; use one of {', '.join(QUANTIZE)}"
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


def export_program(
    module: Any, example: Any, fmt: str, output: Path, output_name: str = "logits"
) -> None:
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
                output_names=[output_name],
                dynamic_shapes=dynamic,
                dynamo=True,
                external_data=False,  # one self-contained file (models under 2 GB)
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


def sidecar(
    model: Any, datamodule: Any, ckpt_path: Path, fmt: str, tower: str | None = None
) -> dict[str, Any]:
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
    shape = hp["input_shape"] if tower is None else hp["input_shapes"][tower]
    out = {
        "format": fmt,
        "input_key": model.input_key if tower is None else tower,
        "input_name": "x",
        "output_name": "logits" if tower is None else "tower_embedding",
        "shape": ["batch", *[int(s) for s in shape]],
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
    if tower is not None:
        encoder = model.encoders[tower]
        out["tower"] = tower
        out["embed_dim"] = int(encoder.embed_dim)
        out["output"] = "L2-normalized embedding (batch, embed_dim) in the aligner's space"
        backbone = encoder.backbone
        if hasattr(backbone, "tokenize"):  # a text tower: token ids of open_clip's tokenizer
            spec = hp["encoders"][tower]
            out["tokenizer"] = {
                "library": "open_clip",
                "name": spec.get("model", "mneme-tiny-clip"),
                "context_length": int(backbone.context_length),
                "call": "open_clip.get_tokenizer(name, context_length)(texts)",
            }
        try:  # the prompts that make zero-shot class embeddings with the text tower
            templates = list(datamodule.prompt_templates)
        except Exception:  # noqa: BLE001 - as for the class names
            templates = ["{}"]
        out["zero_shot_templates"] = templates
    return out


def load_model(config_args: list[str], ckpt_path: Path):
    """The config's module (and the CLI, for its datamodule and callbacks) with the
    checkpoint's weights, on the CPU."""
    from mneme.app.cli.checks import check_checkpoint, check_checkpoint_model
    from mneme.app.cli.parser import build_cli

    checkpoint = check_checkpoint(str(ckpt_path))
    cli = build_cli(config_args + ["--trainer.logger", "false"], run=False)
    cls = type(cli.model)
    check_checkpoint_model(checkpoint, cli.config["model"]["class_path"])
    hparams = {
        k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")
    }
    if "num_classes" not in hparams or not {"input_shape", "input_shapes"} & set(hparams):
        raise ConfigError(
            f"ckpt_path: '{ckpt_path}' holds no num_classes/input_shape(s) hyperparameters; "
            "export a checkpoint of a ContinualClassifier or a ContrastiveAligner"
        )
    model = cls(**hparams)
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    del checkpoint
    return model.cpu().eval(), cli


def check_single_head(model: Any) -> None:
    if getattr(model, "num_heads", 1) != 1:
        raise ConfigError(
            "model.multi_head: a multi-head model needs its task id at each call, which the "
            "exported program does not take; export a single-head model (multi_head: false)"
        )


def target_of(model: Any, tower: str | None) -> tuple[Any, str]:
    """The module exported (the classifier, or the aligner's ``tower``) and its input key."""
    towers = getattr(model, "encoders", None)
    if tower is None:
        if towers is not None:
            raise ConfigError(
                f"--tower: a {type(model).__name__} exports one tower at a time; pass "
                f"--tower with one of {list(towers)}"
            )
        check_single_head(model)
        return model, model.input_key
    if towers is None or tower not in towers:
        known = list(towers) if towers is not None else []
        raise ConfigError(
            f"--tower: {type(model).__name__} has no tower {tower!r}"
            + (f"; use one of {known}" if known else "; drop --tower (a classifier is one model)")
        )
    return towers[tower], tower


def quantization_spec(cli: Any, option: str, tower: str | None) -> dict[str, Any] | None:
    """What to quantize: ``option`` (a mode, ``none``, or ``config``: the config's
    Quantization callback), with that callback's ``exclude``/``encoders``/calibration; the
    ``exclude`` prefixes are made relative to the exported ``tower``. ``None``: float."""
    from mneme.callbacks import Quantization

    found = [c for c in getattr(cli.trainer, "callbacks", []) if isinstance(c, Quantization)]
    callback = found[0] if found else None
    if option == "none" or (option == "config" and callback is None):
        return None
    mode = callback.mode if option == "config" else option
    exclude = list(callback.exclude) if callback else []
    encoders = callback.encoders if callback else None
    if tower is not None:
        if encoders is not None and tower not in encoders:
            return None  # the config keeps this tower float
        prefix = f"encoders.{tower}."
        exclude = [e.removeprefix(prefix) for e in exclude if e.startswith(prefix)]
    batches = callback.calibration_batches if callback else 8
    return {"mode": mode, "exclude": exclude, "calibration_batches": batches}


def calibration_batches(datamodule: Any, key: str, count: int) -> list[Any]:
    """``count`` input batches of field ``key``, one per training experience in turn (so a
    static scale sees every experience's data)."""
    iterators = [iter(e.batches(64)) for e in datamodule.train_experiences]
    out: list[Any] = []
    while len(out) < count and iterators:
        for it in list(iterators):
            batch = next(it, None)
            if batch is None:
                iterators.remove(it)
            elif len(out) < count:
                out.append(batch[key])
    return out


def check_onnx_mode(mode: str) -> None:
    """Refuse a quantization mode ONNX cannot carry, naming the fix."""
    if mode in ONNX_QUANTIZE or mode in ("none", "config"):
        return
    why = (
        "weights (the exporter folds them back to float32)"
        if mode == "ptq_weight_only"
        else "matmul (the ONNX exporter has no translation of aten._int_mm)"
    )
    raise ConfigError(
        f"--quantize {mode}: ONNX cannot hold torchao's int8 {why}; use --format "
        "torch.export, or --quantize ptq_dynamic for ONNX (onnxruntime's int8)"
    )


def quantize_target(target: Any, spec: dict[str, Any], fmt: str, datamodule: Any, key: str):
    """``target`` quantized for ``fmt`` (torchao in place for torch.export; ONNX is
    quantized after its export, see :func:`quantize_onnx`). Returns the sidecar's entry."""
    import torchao
    from mneme.app.compress.quantize import float_layers, quantize_model

    mode = spec["mode"]
    left = float_layers(target, spec["exclude"])
    if fmt == "onnx":
        check_onnx_mode(mode)
        if spec["exclude"]:
            raise ConfigError(
                f"--quantize {mode}: onnxruntime's quantize_dynamic quantizes every MatMul; "
                f"Quantization.exclude {spec['exclude']} needs --format torch.export"
            )
        import onnxruntime

        backend = f"onnxruntime {onnxruntime.__version__} quantize_dynamic (QInt8 weights)"
        return {"mode": mode, "backend": backend, "float_layers": left}
    calibration = None
    if mode == "ptq_static":
        calibration = calibration_batches(datamodule, key, spec["calibration_batches"])
    quantize_model(target, mode, calibration, exclude=spec["exclude"], inplace=True)
    return {
        "mode": mode,
        "backend": f"torchao {torchao.__version__} (load with `import torchao` first)",
        "exclude": spec["exclude"],
        "float_layers": left,
    }


def quantize_onnx(path: Path) -> None:
    """onnxruntime's dynamic int8 quantization of the ONNX file at ``path``, in place."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.name + ".int8")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" notice, on every call
    try:
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    tmp.replace(path)


def example_input(datamodule: Any, key: str, shape: Any):
    """Two samples of field ``key`` from the test stream (the stream's dtype: token ids for
    text); random ones of ``shape`` if the stream cannot serve them here."""
    import torch

    try:
        return next(iter(datamodule.test_experiences[0].batches(2)))[key]
    except Exception:  # noqa: BLE001 - any stream failure: trace on a random input instead
        return torch.randn(2, *shape)


def export(
    config_args: list[str],
    ckpt_path: str,
    fmt: str,
    output: str | None = None,
    quantize: str = "config",
    tower: str | None = None,
) -> tuple[Path, Path]:
    """Export the checkpoint's model (or an aligner's ``tower``), int8 where ``quantize``
    (or the config's Quantization callback) asks; returns the artifact's and its sidecar's
    paths."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize: unknown mode {quantize!r}; use one of {QUANTIZE}")
    if fmt == "onnx":
        check_onnx_mode(quantize)  # before anything loads
    ckpt = Path(ckpt_path)
    out = Path(output) if output else ckpt.with_suffix(SUFFIX[fmt])
    side = out.with_name(out.name + ".json")
    for path in (out, side):  # an earlier export is never overwritten
        if path.exists():
            raise ConfigError(
                f"--output: '{path}' exists (an earlier export, kept); pass another --output "
                "or delete it"
            )
    import torch

    with torch.no_grad():  # inference only; grad mode is the caller's again afterwards
        return _export_model(config_args, ckpt, fmt, out, side, quantize, tower)


def _export_model(
    config_args: list[str], ckpt: Path, fmt: str, out: Path, side: Path, quantize: str, tower
) -> tuple[Path, Path]:
    model, cli = load_model(config_args, ckpt)
    target, key = target_of(model, tower)
    merge_lora(model)
    remove_pruning(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = model.hparams["input_shape"] if tower is None else model.hparams["input_shapes"][tower]
    example = example_input(cli.datamodule, key, shape)
    spec = quantization_spec(cli, quantize, tower)
    quantized = None
    if spec is not None:
        quantized = quantize_target(target.eval(), spec, fmt, cli.datamodule, key)
    export_program(
        logits_module(target), example, fmt, out, "logits" if tower is None else "tower_embedding"
    )
    if quantized is not None and fmt == "onnx":
        quantize_onnx(out)
    meta = sidecar(model, cli.datamodule, ckpt, fmt, tower)
    meta["dtype"] = str(example.dtype).removeprefix("torch.")
    meta["quantization"] = quantized
    side.write_text(json.dumps(meta, indent=2) + "\n")
    return out, side


def main(argv: list[str]) -> None:
    """``mneme export ...``: one line on the user's errors, the written paths on success."""
    from mneme.app.cli.main import debug_mode

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
