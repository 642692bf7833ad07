"""Writing a plain ``x -> output`` module as a ``torch.export`` program or an ONNX graph (a
dynamic batch dimension), and naming the submodule torch could not trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError

FORMATS = ("torch.export", "onnx")
SUFFIX = {"torch.export": ".pt2", "onnx": ".onnx"}


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


def fusion_module(model: Any, modalities: list[str]):
    """``(x_1, ..., x_n) -> logits`` of a model that takes a batch of several modalities
    (a ``FusionClassifier``), one positional input per modality, as a plain ``nn.Module``."""
    from torch import nn

    class _FusedLogits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(dict(zip(modalities, inputs, strict=True)))

    return _FusedLogits(model).eval()


def export_program(
    module: Any,
    example: Any,
    fmt: str,
    output: Path,
    output_name: str = "logits",
    input_names: list[str] | None = None,
) -> None:
    """Write ``module`` (``x -> logits``; with a tuple ``example``, one input per item, named
    ``input_names``) in ``fmt`` with a dynamic batch dimension; a model that
    ``torch.export`` cannot trace (data-dependent control flow) ends in a ConfigError naming
    the module."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    if isinstance(example, tuple):  # forward(*inputs): one spec per positional input
        args, dynamic = example, (tuple({0: batch} for _ in example),)
        names = input_names or [f"x{i}" for i in range(len(example))]
    else:
        args, dynamic, names = (example,), {"x": {0: batch}}, ["x"]
    try:
        if fmt == "torch.export":
            program = torch.export.export(module, args, dynamic_shapes=dynamic)
            torch.export.save(program, str(output))
        else:
            torch.onnx.export(
                module,
                args,
                str(output),
                input_names=names,
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
