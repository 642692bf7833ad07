"""Every private Lightning or torch internal Mneme relies on, each behind one small function.

Mneme reads public APIs only, except here. Each entry says which public alternative is
missing; ``tests/test_private_api.py`` checks every one against the pinned versions
(``lightning>=2.6,<2.7``, ``torch>=2.14.1,<2.15``) and fails loudly, naming the entry, when an
upgrade changes it. No Lightning import here: the functions take the objects they read.

The two private ``LightningCLI`` methods ``mneme.app.cli.lightning_cli.MnemeCLI`` overrides are
listed in :data:`LIGHTNING_CLI_OVERRIDES` (an override cannot sit behind a function).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's --help loads no torch
    from torch import Tensor, nn

T = TypeVar("T")

# LightningCLI methods ``mneme.app.cli.lightning_cli.MnemeCLI`` overrides, with why and the
# signature they have in Lightning 2.6.
LIGHTNING_CLI_OVERRIDES = {
    # Lightning merges the checkpoint's hyper_parameters into the config here, and their
    # `_class_path` decides which module gets imported. Missing: an option to keep the config
    # as given when resuming.
    "_parse_ckpt_path": "(self) -> None",
    # Lightning turns SIGTERM into SystemExit(None) and Ctrl-C into SystemExit(1) inside it.
    # Missing: a hook around the subcommand's run (before_/after_<subcommand> run outside it).
    "_run_subcommand": "(self, subcommand: str) -> None",
}


def outside_hyperparameter_context(load: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``load(*args, **kwargs)`` in a fresh ``contextvars.Context``.

    LightningCLI instantiates a module inside Lightning's private ``_given_hyperparameters``
    ContextVar, whose value ``save_hyperparameters`` takes as the module's own; a module
    that loads another one from a checkpoint while it is built (the few-shot evaluator, a
    teacher) would hand that model its own hyperparameters. Missing: a way to build a module
    with its checkpoint's hyperparameters whatever context the caller is in."""
    return contextvars.Context().run(load, *args, **kwargs)


def finetuning_is_restarting(callback: Any) -> bool:
    """Whether a ``lightning.pytorch.callbacks.BaseFinetuning`` was restored from a
    checkpoint (its private ``_restarting``, set by its ``load_state_dict``). Missing: a public
    flag; a subclass cannot tell a resumed fit from a fresh one otherwise."""
    return bool(callback._restarting)


def exclude_from_ddp_sync(module: nn.Module, names: Sequence[str]) -> None:
    """Tell DistributedDataParallel, before it wraps ``module``, not to broadcast the named
    parameters and buffers (equal on every process by construction). Missing: a DDP argument
    that Lightning's ``DDPStrategy`` would pass; this static method is how DDP itself reads
    ``_ddp_params_and_buffers_to_ignore``."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(names))


def pruning_methods(module: nn.Module) -> Iterator[tuple[nn.Module, str, Any]]:
    """``(submodule, tensor name, method)`` for every ``torch.nn.utils.prune`` method applied
    in ``module``. Missing: a public listing (``prune.is_pruned`` only says whether any is);
    the methods are forward pre-hooks and name their tensor in ``_tensor_name``."""
    from torch.nn.utils import prune

    for m in module.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                yield m, hook._tensor_name, hook


def shell_with_copied_children(module: nn.Module, copy_child: Callable[[nn.Module], Any]) -> Any:
    """A shallow copy of ``module`` (its other attributes, e.g. a Lightning trainer, shared)
    whose child modules are ``copy_child(child)`` and whose own parameter and buffer tables
    are copies. Missing: a public ``nn.Module`` copy that replaces the children alone;
    ``copy.deepcopy`` would copy the trainer and its data too."""
    import copy

    shell = copy.copy(module)
    shell._modules = {k: copy_child(v) for k, v in module._modules.items()}
    shell._parameters = dict(module._parameters)
    shell._buffers = dict(module._buffers)
    return shell


# -- multi-tensor arithmetic: ``torch._foreach_*`` (what torch's own optimizers use); missing:
# a public multi-tensor API. One fused kernel per call over all tensors of a list.
def foreach_addcmul(base: list[Tensor], a: list[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """``[x + y * z for x, y, z in zip(base, a, b)]``."""
    import torch

    return list(torch._foreach_addcmul(base, a, list(b)))


def foreach_addcmul_(base: list[Tensor], a: list[Tensor], b: list[Tensor], value: float) -> None:
    """In place: ``x += value * y * z`` for each ``x`` of ``base``."""
    import torch

    torch._foreach_addcmul_(base, a, b, value=value)


def foreach_norm(tensors: list[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor."""
    import torch

    return list(torch._foreach_norm(tensors))


def foreach_mul_(tensors: list[Tensor], factors: list[Tensor] | Tensor) -> None:
    """In place: each tensor times its factor (or all times one 0-d tensor)."""
    import torch

    torch._foreach_mul_(tensors, factors)


def run_exit_handlers() -> None:
    """Run the ``atexit`` handlers now, as a normal interpreter exit runs them first, before
    an ``os._exit`` that skips the rest of the teardown. Missing: a public ``atexit`` call
    that runs the handlers (CPython's ``atexit._run_exitfuncs``)."""
    import atexit

    atexit._run_exitfuncs()
