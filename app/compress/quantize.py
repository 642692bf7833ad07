"""Int8 quantization of a model's ``nn.Linear`` layers with torchao (the export's and the
:class:`~mneme.callbacks.Quantization` callback's model transform).

torchao, not ``torch.ao.quantization``: the latter (eager ``prepare``/``convert``, FX) is
deprecated in torch 2.x in favour of torchao, which the pinned torch 2.14 pairs with
(torchao 0.18). Its CPU int8 paths work on ``nn.Linear`` only (``quantize_`` silently leaves a
``Conv2d`` in float), so a model is refused when it holds nothing to quantize.

Modes:

- ``ptq_dynamic``: int8 weights (per output channel) and int8 activations quantized per token
  at run time (``Int8DynamicActivationInt8WeightConfig``).
- ``ptq_weight_only``: int8 weights, float activations (``Int8WeightOnlyConfig``).
- ``ptq_static``: int8 weights and int8 activations with a fixed per-layer scale calibrated on
  ``calibration`` batches (``Int8StaticActivationInt8WeightConfig``; the calibration, the
  largest absolute input of each layer over the batches, is written here: torchao 0.18 has no
  observer pass for this config).
- ``qat``: :func:`prepare_qat` inserts fake quantization (int8 per-token activations, int8
  per-channel weights) for training; :func:`convert_qat` then swaps it for the
  ``ptq_dynamic`` int8 kernels.

Example::

    from mneme.app.compress.quantize import quantize_model
    int8 = quantize_model(model.encoder, "ptq_dynamic")  # a quantized copy
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.app.core.private_api import pruning_methods
from torch import Tensor, nn

MODES = ("ptq_dynamic", "ptq_weight_only", "ptq_static", "qat")


def attention_projections(model: nn.Module) -> set[str]:
    """Names of the ``nn.MultiheadAttention`` output projections in ``model``: Linear
    modules whose ``forward`` never runs (``F.multi_head_attention_forward`` reads their
    ``weight`` directly and transposes it, which torchao's ``Int8Tensor`` does not implement:
    ``aten.t``), so they stay float (torch names their class ``NonDynamicallyQuantizableLinear``
    for the same reason)."""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def _linear_filter(
    exclude: Iterable[str], model: nn.Module | None = None
) -> Callable[[nn.Module, str], bool]:
    skipped = tuple(exclude)
    attention = attention_projections(model) if model is not None else set()

    def keep(module: nn.Module, fqn: str) -> bool:
        return (
            isinstance(module, nn.Linear)
            and fqn not in attention
            and not any(fqn == e or fqn.startswith(e + ".") for e in skipped)
        )

    return keep


def float_layers(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, int]:
    """What stays float when ``model`` is quantized, by layer kind (not excluded by the user):
    ``{"Conv2d": 3, "MultiheadAttention.out_proj": 2, ...}``; for the one-line notice that
    names the module types torchao's CPU int8 path leaves alone."""
    skipped = tuple(exclude)
    attention = attention_projections(model)
    counts: dict[str, int] = {}
    for name, m in model.named_modules():
        if any(name == e or name.startswith(e + ".") for e in skipped):
            continue
        if name in attention:
            kind = "MultiheadAttention.out_proj"
        elif isinstance(m, nn.MultiheadAttention):
            kind = "MultiheadAttention.in_proj"  # a raw Parameter, no Linear to swap
        elif isinstance(m, nn.modules.conv._ConvNd | nn.Embedding):
            kind = type(m).__name__
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def check_quantizable(model: nn.Module, field: str = "mode", exclude: Iterable[str] = ()) -> None:
    """Refuse in one line a model with no ``nn.Linear`` to quantize (naming its layer types)."""
    keep = _linear_filter(exclude, model)
    if not any(keep(m, n) for n, m in model.named_modules()):
        kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise ConfigError(
            f"Quantization.{field}: torchao's CPU int8 kernels quantize nn.Linear only (not "
            "a MultiheadAttention's out_proj); "
            f"{type(model).__name__} has none (its layers: {', '.join(kinds) or 'none'}); "
            "quantize a model with Linear layers or drop the callback"
        )


def tower_exclude(model: nn.Module, encoders: Iterable[str] | None, field: str) -> list[str]:
    """The ``exclude`` prefixes that leave every tower of an aligner (``model.encoders``, a
    ``ModuleDict``) float except ``encoders``; ``None``: every tower quantized. A name that is
    no tower, or a model without towers, is refused naming ``field``."""
    if encoders is None:
        return []
    towers = getattr(model, "encoders", None)
    if not isinstance(towers, nn.ModuleDict):
        raise ConfigError(
            f"{field}: {type(model).__name__} has no per-modality encoders (a "
            "ContrastiveAligner option); leave it unset, or name submodules in exclude"
        )
    unknown = [e for e in encoders if e not in towers]
    if unknown or not list(encoders):
        raise ConfigError(
            f"{field}: {unknown or 'an empty list'} names no encoder; pick from {list(towers)}"
        )
    prefix = next(n for n, m in model.named_modules() if m is towers)
    return [f"{prefix}.{name}" for name in towers if name not in set(encoders)]


def _base_config(mode: str) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if mode in ("ptq_dynamic", "qat"):
        return Int8DynamicActivationInt8WeightConfig()
    if mode == "ptq_weight_only":
        return Int8WeightOnlyConfig()
    raise ConfigError(f"Quantization.mode: one of {MODES}, got '{mode}'")


@torch.no_grad()
def _calibrate(model: nn.Module, keep, calibration: Iterable[Any], run) -> dict[str, Tensor]:
    """Largest absolute input of each kept Linear over the calibration batches."""
    amax: dict[str, Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if keep(module, name):

            def hook(mod, args, name=name):
                value = args[0].detach().abs().amax().float()
                amax[name] = torch.maximum(amax[name], value) if name in amax else value

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        for batch in calibration:
            run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return amax


def quantize_model(
    module: nn.Module,
    mode: str = "ptq_dynamic",
    calibration: Iterable[Any] | None = None,
    run: Callable[[nn.Module, Any], Any] | None = None,
    exclude: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """An int8 copy of ``module`` (``inplace``: ``module`` itself): its ``nn.Linear`` layers,
    except those named in ``exclude`` (prefixes), quantized by torchao in ``mode``.

    ``ptq_static`` needs ``calibration`` (an iterable of inputs) and calls
    ``run(model, batch)`` on each (default ``model(batch)``). A ``qat`` model (prepared with
    :func:`prepare_qat`) is converted. Pruning masks (torch prune) are made permanent
    first. Call it on a model in eval mode for inference.
    """
    if mode not in MODES:
        raise ConfigError(f"Quantization.mode: one of {MODES}, got '{mode}'")
    from torchao.quantization import quantize_

    model = module if inplace else copy.deepcopy(detach_pruned_weights(module))
    remove_pruning(model)
    exclude = tuple(exclude)
    if mode == "qat" and is_qat_prepared(model):
        return convert_qat(model, exclude)
    if mode == "qat":
        # A model trained with QAT and reloaded plain (a checkpoint keeps each Linear's
        # keys, not its fake quantizers; convert would skip a plain Linear): the same int8
        # kernels as convert, from the trained weights.
        mode = "ptq_dynamic"
    check_quantizable(model, exclude=exclude)
    keep = _linear_filter(exclude, model)
    if mode != "ptq_static":
        quantize_(model, _base_config(mode), filter_fn=keep)
        return model
    if calibration is None:
        raise ConfigError("Quantization.calibration_batches: ptq_static needs calibration data")
    from torchao.quantization import Int8StaticActivationInt8WeightConfig
    from torchao.quantization.granularity import PerRow, PerTensor

    amax = _calibrate(model, keep, calibration, run or (lambda m, b: m(b)))
    for name, value in amax.items():
        # One scale per layer, shaped as its 2-D (batch, features) input.
        scale = (value.clamp_min(1e-8) / 127.0).reshape(1, 1)
        config = Int8StaticActivationInt8WeightConfig(
            act_quant_scale=scale, granularity=[PerTensor(), PerRow()]
        )
        quantize_(model, config, filter_fn=lambda m, fqn, name=name: fqn == name)
    return model


@torch.no_grad()
def detach_pruned_weights(module: nn.Module) -> nn.Module:
    """Recompute each torch-prune masked weight (``orig * mask``) without autograd history:
    a masked weight computed in a grad-enabled forward is no graph leaf, which
    ``copy.deepcopy`` refuses. Same values; the next forward recomputes it as before."""
    for m, name, method in pruning_methods(module):
        setattr(m, name, method.apply_mask(m))
    return module


def remove_pruning(module: nn.Module) -> int:
    """``prune.remove`` every torch-prune parametrization in ``module``, in place: the masked
    weights become plain Parameters (zeros kept), which quantizers and exporters need;
    returns how many were made permanent."""
    from torch.nn.utils import prune

    methods = list(pruning_methods(module))
    for m, name, _ in methods:
        prune.remove(m, name)
    return len(methods)


def prepare_qat(module: nn.Module, exclude: Iterable[str] = ()) -> nn.Module:
    """Insert int8 fake quantization in ``module``'s ``nn.Linear`` layers, in place
    (``torchao.quantization.qat``; ``FakeQuantizedLinear`` keeps the weight Parameter)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    exclude = tuple(exclude)
    check_quantizable(module, exclude=exclude)
    # Asymmetric per-token activations: torchao 0.18 fake-quantizes no symmetric per-token.
    config = QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel"),
        step="prepare",
    )
    quantize_(module, config, filter_fn=_linear_filter(exclude, module))
    return module


def is_qat_prepared(module: nn.Module) -> bool:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return any(isinstance(m, FakeQuantizedLinear) for m in module.modules())


def convert_qat(module: nn.Module, exclude: Iterable[str] = ()) -> nn.Module:
    """Swap the fake quantization of :func:`prepare_qat` for int8 kernels, in place."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    skipped = tuple(exclude)
    attention = attention_projections(module)

    def keep(m: nn.Module, fqn: str) -> bool:
        return (
            isinstance(m, FakeQuantizedLinear | nn.Linear)
            and fqn not in attention
            and not any(fqn == e or fqn.startswith(e + ".") for e in skipped)
        )

    quantize_(module, QATConfig(_base_config("qat"), step="convert"), filter_fn=keep)
    return module


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())``: the size of the saved model."""
    import io

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes
