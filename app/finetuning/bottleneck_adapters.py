"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) on any torch module.

Why this is written by hand and not taken from ``peft``: ``peft`` (checked in 0.21.2) has no
bottleneck adapter. Its ``PeftType`` list has no Houlsby/Pfeiffer entry; ``adaption_prompt``
is LLaMA-Adapter (gated prompts inside LLaMA attention), and the one down/up bottleneck in
its tuners (``shadow``, ShadowPEFT) is a parallel "shadow" network that rides the decoder
loop of a transformers language model, not a residual adapter after an arbitrary module.

What an adapter is here: after a target module, ``y = out + up(act(down(out)))``, the
"sequential" bottleneck of both papers (Houlsby after the attention and the MLP of each
layer; Pfeiffer after the MLP only: choose the targets accordingly). It is a child module of
the target (``<target>.bottleneck_adapter``), so its parameters are named under the model
and travel with its ``state_dict``, plus a forward hook on the target that adds it. The hook
is a bound method of the adapter, so ``copy.deepcopy`` and pickling carry it to the copy's
own adapter.

Target names match the way ``peft``'s ``target_modules`` does
(``peft.tuners.tuners_utils.check_target_module_exists``): a string is a regular expression
matched against the *whole* module name (``re.fullmatch``); a list holds exact names or
name suffixes after a dot (``"fc2"`` matches ``blocks.0.mlp.fc2``). That function is not
called: it takes a ``PeftConfig`` and its module imports transformers and accelerate (about
four seconds more at start-up); the three lines of rule are restated in :func:`matches` and
a test checks them against peft's own function.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch
from mneme.app.core.errors import ConfigError
from torch import Tensor, nn

__all__ = ["Bottleneck", "add_bottleneck_adapters", "matches"]

_FIELD = "model.peft.target_modules"
_CHILD = "bottleneck_adapter"
# Containers whose forward runs every child in turn: an adapter registered as their child
# would run as one more layer, so it lives in a dict on the nearest ancestor that is not one.
_RUNS_CHILDREN = (nn.Sequential, nn.ModuleList)
_HOME = "bottleneck_adapters"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_INITS = ("zeros", "houlsby")
# Modules that are never targets: adapters from an earlier call, and the prompt tokens of
# app/finetuning/prompt_tuning.py (matching its name keeps this module free of that import).
_NOT_TARGETS = {_CHILD, _HOME, "visual_prompts"}


class Bottleneck(nn.Module):
    """``down -> act -> up`` over the channel axis ``channel_dim`` of its input, returning
    ``x + up(act(down(x)))``'s second term (the hook adds the residual).

    A ``Linear`` over the channel axis is the same map as a 1x1 convolution on ``(N, C, H,
    W)``, so one module serves tokens ``(N, L, D)``, features ``(N, D)`` and feature maps.

    ``init="zeros"``: ``up`` is zero, so the adapted model equals the original at start
    (the LoRA / AdaptFormer convention); ``down`` keeps ``nn.Linear``'s default init.
    ``init="houlsby"``: both weights from a normal with std 1e-3 truncated at two std,
    biases zero, as in google-research/adapter-bert ``feedforward_adapter`` (near identity).
    """

    def __init__(
        self,
        width: int,
        hidden: int,
        activation: str = "relu",
        init: str = "zeros",
        channel_dim: int = -1,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.down = nn.Linear(width, hidden, device=device, dtype=dtype)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(hidden, width, device=device, dtype=dtype)
        if init == "zeros":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, std=1e-3, a=-2e-3, b=2e-3)
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_dim in (-1, x.ndim - 1):
            return self.up(self.act(self.down(x)))
        x = x.movedim(self.channel_dim, -1)
        return self.up(self.act(self.down(x))).movedim(-1, self.channel_dim)

    def residual(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook of the target: its output plus the adapter's."""
        return output + self(output)


def matches(target_modules: str | Sequence[str], name: str) -> bool:
    """Whether module ``name`` is a target, with peft's ``target_modules`` rule: a string is a
    regex that must match the whole name, a list names modules exactly or by suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def _closest(target_modules: str | Sequence[str], names: list[str]) -> list[str]:
    """Up to five real module names nearest to what was asked: full names for a regex (it
    must match a whole name), full and leaf names for a list (an item may be a suffix)."""
    if isinstance(target_modules, str):
        wanted, candidates = [target_modules], names
    else:
        wanted = list(target_modules)
        candidates = list(dict.fromkeys(names + [n.rsplit(".", 1)[-1] for n in names]))
    scored: dict[str, float] = {}
    for want in wanted:
        for candidate in difflib.get_close_matches(want, candidates, n=5, cutoff=0.0):
            ratio = difflib.SequenceMatcher(None, want, candidate).ratio()
            scored[candidate] = max(scored.get(candidate, 0.0), ratio)
    return sorted(scored, key=lambda c: -scored[c])[:5]


def _typed_width(module: nn.Module) -> tuple[int, int] | None:
    """``(width, channel_dim)`` when the module type says it, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.out_channels, 1
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return module.num_features, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], -1
    return None


@torch.no_grad()
def _probe_widths(
    model: nn.Module, targets: dict[str, nn.Module], input_shape: Sequence[int]
) -> dict[str, tuple[int, int]]:
    """One forward of zeros ``(2, *input_shape)`` in eval mode, recording each target's output
    shape. A 4-D output is read as ``(N, C, H, W)`` (channel axis 1); a 2-D or 3-D one as
    ``(N, D)`` / ``(N, L, D)`` tokens (channel axis -1). Every module's train/eval flag is
    restored afterwards, not just the root's, so deliberately frozen norms stay frozen."""
    shapes: dict[str, torch.Size] = {}
    handles = []
    for name, module in targets.items():

        def record(module: nn.Module, args: tuple, output: object, name: str = name) -> None:
            if not isinstance(output, Tensor):
                raise ConfigError(
                    f"{_FIELD}: '{name}' ({type(module).__name__}) returns "
                    f"{type(output).__name__}, not a tensor; target a module that returns one"
                )
            shapes.setdefault(name, output.shape)

        handles.append(module.register_forward_hook(record))
    flags = {m: m.training for m in model.modules()}
    reference = next(model.parameters(), None)
    x = torch.zeros(
        2,
        *input_shape,
        device=None if reference is None else reference.device,
        dtype=None if reference is None else reference.dtype,
    )
    try:
        model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags.items():
            m.training = flag
    widths = {}
    for name in targets:
        if name not in shapes:
            raise ConfigError(
                f"{_FIELD}: '{name}' is not called in the model's forward; target a module that is"
            )
        shape = shapes[name]
        if len(shape) not in (2, 3, 4):
            raise ConfigError(
                f"{_FIELD}: '{name}' outputs shape {tuple(shape)}; adapters take (N, D), "
                "(N, L, D) or (N, C, H, W)"
            )
        widths[name] = (shape[1], 1) if len(shape) == 4 else (shape[-1], -1)
    return widths


def add_bottleneck_adapters(
    model: nn.Module,
    target_modules: str | Sequence[str],
    reduction: int = 16,
    hidden: int | None = None,
    activation: str = "relu",
    init: str = "zeros",
    input_shape: Sequence[int] | None = None,
) -> list[str]:
    """Add a residual bottleneck adapter after every module ``target_modules`` names, in place.
    Returns the adapted module names.

    Each adapter maps the target's output width ``W`` to ``hidden`` (default
    ``max(1, W // reduction)``, Pfeiffer's reduction factor 16) and back. ``W`` comes from
    the module type for ``Linear`` (``out_features``, tokens ``(N, L, D)`` or ``(N, D)``),
    ``Conv1d/2d/3d`` (``out_channels``, axis 1), ``BatchNorm``, ``GroupNorm`` and
    ``LayerNorm``; for anything else (a transformer block, a timm MLP, a CNN stage) one
    probe forward of zeros shaped ``(2, *input_shape)`` measures it, so ``input_shape``
    (``(C, H, W)``, without the batch) is then required.

    Only adds: the adapters' parameters are trainable and nothing of ``model`` is frozen
    here (the caller decides what trains).

    Example::

        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        add_bottleneck_adapters(vit, r"blocks\\.\\d+\\.mlp", input_shape=(3, 224, 224))
        # or by suffix, no probe needed for Linear targets:
        add_bottleneck_adapters(cnn_or_vit, ["fc2"], reduction=8)

    Raises:
        ConfigError: no module matches (the message lists the closest names), a target
            already has an adapter, a width cannot be known without ``input_shape``, or an
            argument is out of range.
    """
    if activation not in _ACTIVATIONS:
        raise ConfigError(
            f"model.peft.activation: unknown '{activation}'; one of {', '.join(_ACTIVATIONS)}"
        )
    if init not in _INITS:
        raise ConfigError(f"model.peft.init: unknown '{init}'; one of {', '.join(_INITS)}")
    if hidden is None and (isinstance(reduction, bool) or reduction < 1):
        raise ConfigError(f"model.peft.reduction: must be an integer >= 1, got {reduction!r}")
    if hidden is not None and (isinstance(hidden, bool) or hidden < 1):
        raise ConfigError(f"model.peft.hidden: must be an integer >= 1, got {hidden!r}")
    if not target_modules:
        raise ConfigError(f"{_FIELD}: empty; name modules by regex or by a list of names")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ConfigError(
                f"{_FIELD}: '{target_modules}' is not a valid regular expression ({error})"
            ) from None

    # The root ("") is never a target.
    names = [n for n, _ in model.named_modules() if n and not _NOT_TARGETS & set(n.split("."))]
    modules = dict(model.named_modules())
    targets = {n: modules[n] for n in names if matches(target_modules, n)}
    if not targets:
        close = ", ".join(_closest(target_modules, names)) or "(the model has no submodules)"
        raise ConfigError(
            f"{_FIELD}: no module of {type(model).__name__} matches {target_modules!r}; "
            f"closest names: {close} (a string is a regex over the whole name, a list holds "
            "names or name suffixes)"
        )
    homes = {n: _adapter_home(model, modules, n) for n in targets}
    twice = [n for n, (home, key) in homes.items() if hasattr(home, key)]
    if twice:
        raise ConfigError(
            f"{_FIELD}: {', '.join(twice[:5])}{' ...' if len(twice) > 5 else ''} already "
            f"{'has' if len(twice) == 1 else 'have'} a bottleneck adapter; "
            "add_bottleneck_adapters is called once per module"
        )

    widths = {n: w for n, m in targets.items() if (w := _typed_width(m)) is not None}
    untyped = {n: m for n, m in targets.items() if n not in widths}
    if untyped:
        if input_shape is None:
            first = next(iter(untyped))
            raise ConfigError(
                f"{_FIELD}: the output width of '{first}' ({type(untyped[first]).__name__}) "
                "is not known from its type; pass input_shape so one probe forward measures it"
            )
        widths.update(_probe_widths(model, untyped, input_shape))

    reference = next(model.parameters(), None)
    for name, module in targets.items():
        width, channel_dim = widths[name]
        own = next(module.parameters(), reference)
        adapter = Bottleneck(
            width,
            hidden if hidden is not None else max(1, width // reduction),
            activation=activation,
            init=init,
            channel_dim=channel_dim,
            device=None if own is None else own.device,
            dtype=None if own is None else own.dtype,
        )
        home, key = homes[name]
        if isinstance(home, nn.ModuleDict) and key not in home:
            home[key] = adapter.train(module.training)
        else:
            home.add_module(key, adapter.train(module.training))
        module.register_forward_hook(adapter.residual)
    return list(targets)


def _adapter_home(
    model: nn.Module, modules: dict[str, nn.Module], name: str
) -> tuple[nn.Module, str]:
    """Where the adapter of target ``name`` is registered, and under which key: the target
    itself (``<target>.bottleneck_adapter``), or for an ``nn.Sequential`` target (a CNN
    stage) the ``bottleneck_adapters`` dict of its nearest ancestor that is no container
    (``bottleneck_adapters.blocks-0``)."""
    if not isinstance(modules[name], _RUNS_CHILDREN):
        return modules[name], _CHILD
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = modules[".".join(parts[:depth])]
        if not isinstance(ancestor, _RUNS_CHILDREN):
            if not hasattr(ancestor, _HOME):
                ancestor.add_module(_HOME, nn.ModuleDict())
            return getattr(ancestor, _HOME), "-".join(parts[depth:])
    raise ConfigError(
        f"{_FIELD}: '{name}' and every module above it are nn.Sequential containers, which "
        "would run an adapter as a layer; target the layers inside it"
    )
