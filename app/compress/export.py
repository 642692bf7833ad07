"""``mneme export``: a trained classifier (or one tower of an aligner) as a ``torch.export``
program (``.pt2``) or an ONNX graph, with a JSON sidecar describing its preprocessing.

    mneme export --config configs/quickstart.yaml \\
        --ckpt_path logs/quickstart/version_0/checkpoints/last.ckpt --format onnx \\
        [--output model.onnx] [--quantize {config,none,ptq_dynamic,ptq_weight_only,ptq_static,qat}]
        [--tower image|text|audio]

The model is the checkpoint's as Lightning loads it (``load_from_checkpoint``, strict: its
``on_load_checkpoint`` runs, so a MoE head rebuilds its experts, a backbone file changed since
training is refused by its SHA-256 and a checkpoint without the encoder's tensors is refused),
made plain first: peft adapters folded into the base weights (peft's ``merge_and_unload``:
LoRA, LoHa, LoKr, IA3) and pruning re-parametrizations made permanent
(``torch.nn.utils.prune.remove``). It maps a batch of
inputs (the sidecar's ``input_key``, ``shape`` with a dynamic batch dimension, ``dtype``,
already standardized with ``normalization`` mean/std as the stream did) to class logits in
the order of ``classes``. onnx/onnxscript are imported only here (``mneme --help`` stays fast).
The command line (argument parsing, the config's LightningCLI) is
:mod:`mneme.app.cli.export_command`; this module takes the module class, datamodule and
callbacks it built.

A :class:`~mneme.app.ContrastiveAligner` exports one tower at a time (``--tower``): its
``ModalityEncoder``, inputs of that modality (the stream's dtype: token ids for text) to the
L2-normalized embedding; the sidecar adds the tokenizer for a text tower. A
:class:`~mneme.app.FusionClassifier` is exported whole, one input per modality (named by its
batch key; the sidecar's ``input_key``, ``shape`` and ``dtype`` list them in that order).

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

import hashlib
import json
from pathlib import Path
from typing import Any

from mneme.app.compress.export_formats import (
    FORMATS,
    SUFFIX,
    export_program,
    fusion_module,
    logits_module,
)
from mneme.app.compress.export_quantization import (
    QUANTIZE,
    check_onnx_mode,
    quantization_spec,
    quantize_onnx,
    quantize_target,
)
from mneme.app.compress.quantize import remove_pruning
from mneme.app.core.errors import ConfigError

__all__ = [
    "FORMATS",
    "QUANTIZE",
    "SUFFIX",
    "check_request",
    "export_model",
    "export_program",
    "load_trained",
    "logits_module",
    "make_plain",
    "merge_adapters",
    "output_paths",
    "target_of",
]


def check_request(fmt: str, quantize: str) -> None:
    """Refuse an unknown format or quantization mode, and a mode ONNX cannot carry, before
    anything loads."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ConfigError(
            f"--quantize: unknown mode {quantize!r}; use one of {', '.join(QUANTIZE)}"
        )
    if fmt == "onnx":
        check_onnx_mode(quantize)


def output_paths(ckpt: Path, output: str | None, fmt: str) -> tuple[Path, Path]:
    """The artifact's and its sidecar's paths: never an earlier export's, never under a
    file."""
    out = Path(output) if output else ckpt.with_suffix(SUFFIX[fmt])
    side = out.with_name(out.name + ".json")
    for path in (out, side):  # an earlier export is never overwritten
        if path.exists():
            raise ConfigError(
                f"--output: '{path}' exists (an earlier export, kept); pass another --output "
                "or delete it"
            )
    for parent in out.parents:  # the nearest existing folder above must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"--output: '{out}' lies under '{parent}', which is a file, not a folder; "
                    "pass an --output in a folder"
                )
            break
    return out, side


def load_trained(module_class: type, ckpt: Path) -> Any:
    """The checkpoint's module on the CPU in eval mode, loaded by Lightning's
    ``load_from_checkpoint``: rebuilt from the checkpoint's hyperparameters, its
    ``on_load_checkpoint`` run (a MoE head's experts, a pretrained backbone's left-out
    tensors after its source's SHA-256 check), then a strict load of every tensor."""
    import torch

    saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(saved, dict) or "pytorch-lightning_version" not in saved:
        raise ConfigError(
            f"ckpt_path: '{ckpt}' is not a Lightning checkpoint (no pytorch-lightning_version); "
            "export a checkpoint `mneme fit` wrote"
        )
    hparams = dict(saved.get("hyper_parameters") or {})
    del saved
    if "num_classes" not in hparams or not {"input_shape", "input_shapes"} & set(hparams):
        raise ConfigError(
            f"ckpt_path: '{ckpt}' holds no num_classes/input_shape(s) hyperparameters; "
            "export a checkpoint of a ContinualClassifier or a ContrastiveAligner"
        )
    try:
        model = module_class.load_from_checkpoint(
            ckpt,
            map_location="cpu",
            weights_only=True,  # tensors and plain data: nothing the file names runs
            strict=True,
            # the class is the config's (checked against the checkpoint's _class_path):
            # no instantiator named by the checkpoint rebuilds it
            _instantiator=None,
        )
    except ConfigError:
        raise
    except RuntimeError as error:  # torch's load_state_dict: missing, unexpected, shapes
        text = " ".join(str(error).split())
        raise ConfigError(
            f"ckpt_path: '{ckpt}' does not hold the weights of the config's model ({text[:300]}); "
            "export a checkpoint this config trained, whole"
        ) from None
    return model.cpu().eval()


def merge_adapters(model: Any) -> int:
    """Fold every peft adapter of ``model``'s backbones into their weights (peft's own
    ``merge_and_unload``; Mneme injects peft into plain backbones and keeps peft's tuner
    with each backbone's :class:`~mneme.app.finetuning.adaptation.BackboneAdaptation`).
    Returns how many backbones were merged."""
    from mneme.app.finetuning.adaptation import BackboneAdaptation

    merged = 0
    for module in list(model.modules()):
        adaptation = getattr(module, "adaptation", None)
        if isinstance(adaptation, BackboneAdaptation) and adaptation.backbone is module:
            merged += int(adaptation.merge_and_unload())
    return merged


def make_plain(model: Any) -> Any:
    """``model`` with its adapters merged and its pruning made permanent, in place."""
    merge_adapters(model)
    remove_pruning(model)
    return model


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
    if is_fusion(model):  # one input per modality, in this order, each named by its key
        modalities = list(model.modalities)
        key: Any = modalities
        name: Any = modalities
        shape: Any = {m: ["batch", *[int(s) for s in hp["input_shapes"][m]]] for m in modalities}
    else:
        key = model.input_key if tower is None else tower
        name = "x"
        dims = hp["input_shape"] if tower is None else hp["input_shapes"][tower]
        shape = ["batch", *[int(s) for s in dims]]
    out = {
        "format": fmt,
        "input_key": key,
        "input_name": name,
        "output_name": "logits" if tower is None else "tower_embedding",
        "shape": shape,
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


def check_single_head(model: Any) -> None:
    if getattr(model, "num_heads", 1) != 1:
        raise ConfigError(
            "model.multi_head: a multi-head model needs its task id at each call, which the "
            "exported program does not take; export a single-head model (multi_head: false)"
        )


def is_fusion(model: Any) -> bool:
    """Whether ``model`` classifies a batch of several modalities at once (a
    ``FusionClassifier``): exported whole, one input per modality."""
    return "fusion" in getattr(model, "hparams", {}) and hasattr(model, "modalities")


def target_of(model: Any, tower: str | None) -> tuple[Any, Any]:
    """The module exported (the classifier, or the aligner's ``tower``) and its input key
    (a fusion's: its modalities)."""
    if is_fusion(model):
        if tower is not None:
            raise ConfigError(
                f"--tower: a {type(model).__name__} is exported whole (one input per modality: "
                f"{list(model.modalities)}); drop --tower"
            )
        return model, list(model.modalities)
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


def example_input(datamodule: Any, key: str, shape: Any, count: int = 2):
    """``count`` samples of field ``key`` from the test stream (the stream's dtype: token ids
    for text); random ones of ``shape`` if the stream cannot serve them here."""
    import torch

    try:
        return next(iter(datamodule.test_experiences[0].batches(count)))[key]
    except Exception:  # noqa: BLE001 - any stream failure: trace on a random input instead
        return torch.randn(count, *shape)


def export_model(
    module_class: type,
    ckpt: Path,
    fmt: str,
    out: Path,
    side: Path,
    quantize: str = "config",
    tower: str | None = None,
    datamodule: Any = None,
    callbacks: list[Any] | None = None,
) -> tuple[Path, Path]:
    """Export the checkpoint's model (or an aligner's ``tower``) to ``out`` with its
    sidecar ``side``, int8 where ``quantize`` (or the config's Quantization callback among
    ``callbacks``) asks; ``datamodule`` gives class names, an example input and calibration
    batches. Returns ``(out, side)``."""
    import torch

    check_request(fmt, quantize)
    with torch.no_grad():  # inference only; grad mode is the caller's again afterwards
        model = make_plain(load_trained(module_class, ckpt))
        target, key = target_of(model, tower)
        out.parent.mkdir(parents=True, exist_ok=True)
        hp = model.hparams
        if is_fusion(model):
            example: Any = tuple(example_input(datamodule, m, hp["input_shapes"][m]) for m in key)
            program = fusion_module(target, key)
        else:
            shape = hp["input_shape"] if tower is None else hp["input_shapes"][tower]
            example, program = example_input(datamodule, key, shape), logits_module(target)
        spec = quantization_spec(list(callbacks or []), quantize, tower)
        quantized = None
        if spec is not None:
            if is_fusion(model) and spec["mode"] == "ptq_static":
                raise ConfigError(
                    "--quantize ptq_static: a fusion model's calibration is not supported; "
                    "use ptq_dynamic or ptq_weight_only"
                )
            quantized = quantize_target(target.eval(), spec, fmt, datamodule, key)
        output_name = "logits" if tower is None else "tower_embedding"
        names = key if is_fusion(model) else None
        export_program(program, example, fmt, out, output_name, input_names=names)
        if quantized is not None and fmt == "onnx":
            quantize_onnx(out)
        meta = sidecar(model, datamodule, ckpt, fmt, tower)
        if isinstance(example, tuple):
            dtypes = zip(key, (str(x.dtype).removeprefix("torch.") for x in example), strict=True)
            meta["dtype"] = dict(dtypes)
        else:
            meta["dtype"] = str(example.dtype).removeprefix("torch.")
        meta["quantization"] = quantized
        side.write_text(json.dumps(meta, indent=2) + "\n")
    return out, side
