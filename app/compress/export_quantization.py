"""The int8 of an export: torchao in place for ``torch.export``, onnxruntime's dynamic int8
for ONNX (see :mod:`mneme.app.compress.export` for which mode goes where)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError

QUANTIZE = ("config", "none", "ptq_dynamic", "ptq_weight_only", "ptq_static", "qat")
ONNX_QUANTIZE = ("ptq_dynamic", "qat")  # through onnxruntime.quantization.quantize_dynamic


def quantization_spec(
    callbacks: list[Any], option: str, tower: str | None
) -> dict[str, Any] | None:
    """What to quantize: ``option`` (a mode, ``none``, or ``config``: the config's
    Quantization callback among ``callbacks``), with that callback's ``exclude``, ``encoders``
    and calibration; the ``exclude`` prefixes are made relative to the exported ``tower``.
    ``None``: float."""
    from mneme.callbacks.compression.quantization import Quantization

    found = [c for c in callbacks if isinstance(c, Quantization)]
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
