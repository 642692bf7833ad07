"""The functional side of gradient-based meta-learning (MAML, first-order MAML, Reptile):
fast weights as plain dicts of tensors, the inner SGD loop on a task's support set, and the
helpers around it. Plain torch (no Lightning); :class:`mneme.app.models.fewshot.maml.MetaLearner`
drives it.

Why ``torch.func`` and no meta-learning library: ``higher`` (archived by its authors) and
``learn2learn`` (no longer maintained) clone or monkey-patch modules to make them
functional, which breaks with newer PyTorch and timm models; PyTorch itself now has what
they offered: :func:`torch.func.functional_call` runs the encoder on a
dict of "fast" weights without copying or patching modules, and :func:`torch.func.grad`
differentiates the inner loss w.r.t. that dict; the returned gradients stay differentiable
at the outer level, so MAML's second-order term comes from PyTorch's own autograd. Any timm
model works unchanged (batch norm buffers and in-place ReLUs included).

Batch norm: as in MAML's reference implementation, batch norm normalizes with the batch
statistics of the set it sees (support during adaptation, query for the outer loss and for
evaluation: transductive over the query set). The running buffers are passed as given to
:func:`functional_call` and updated during meta-training; evaluation runs batch norm layers
in train mode on copies of the buffers (``transductive_batch_norm: false`` evaluates with the
running statistics instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from mneme.app.core.errors import ConfigError
from torch import Tensor, nn
from torch.func import functional_call, grad

# fast weights: {"encoder": {name: tensor}, "head": {"weight": ..., "bias": ...}}
Weights = dict[str, dict[str, Tensor]]


def functional_logits(
    encoder: nn.Module, weights: Weights, buffers: dict[str, Tensor], x: Tensor
) -> Tensor:
    """The logits of ``encoder`` + linear head run on the fast ``weights`` (no module copy)."""
    features = functional_call(encoder, (weights["encoder"], buffers), (x,))
    head = weights["head"]
    return F.linear(features, head["weight"], head["bias"])


def zero_head_start(theta: Weights, n_way: int, width: int) -> Weights:
    """A task's initial fast weights under ``head_init: zero``: ``theta``'s encoder and an
    all-zero ``n_way`` head of input ``width`` (not meta-learned, so detached)."""
    p = next(iter(theta["encoder"].values()))
    zeros = {
        "weight": p.new_zeros(n_way, width).detach(),
        "bias": p.new_zeros(n_way).detach(),
    }
    return {"encoder": theta["encoder"], "head": zeros}


def inner_loop(
    encoder: nn.Module,
    start: Weights,
    buffers: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
    inner_lr: float,
    second_order: bool,
) -> tuple[Weights, list[Tensor]]:
    """``steps`` SGD steps of ``inner_lr`` on ``(x, y)`` from ``start``: the fast weights
    and the support loss before each step. ``second_order``: the inner gradients stay
    differentiable w.r.t. ``start`` (MAML); else they are constants (the fast weights
    still depend on ``start`` with an identity Jacobian: first-order MAML)."""

    def support_loss(weights: Weights, buffers, x: Tensor, y: Tensor):
        loss = F.cross_entropy(float32_logits(functional_logits(encoder, weights, buffers, x)), y)
        return loss, loss.detach()

    inner_grad = grad(support_loss, has_aux=True)
    fast, losses = start, []
    for _ in range(steps):
        at = fast if second_order else detach_weights(fast)
        grads, loss = inner_grad(at, buffers, x, y)
        losses.append(loss)
        fast = {
            part: {k: w - inner_lr * grads[part][k] for k, w in fast[part].items()} for part in fast
        }
    return fast, losses


def episode_tensors(batch: dict, key: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(support[key], support_label, query[key], query_label)`` of an episodic meta-batch."""
    try:
        return (
            batch["support"][key],
            batch["support_label"],
            batch["query"][key],
            batch["query_label"],
        )
    except KeyError as err:
        raise ConfigError(
            f"model.input_key: the meta-batch has no {err}; an episodic batch holds "
            f"support[{key!r}], support_label, query[{key!r}] and query_label (set input_key "
            "to the field the encoder reads)"
        ) from None


def float32_logits(logits: Tensor) -> Tensor:
    """Half-precision logits (under autocast) in float32 for the loss; others unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def detach_weights(weights: Weights) -> Weights:
    return {part: {k: w.detach() for k, w in ws.items()} for part, ws in weights.items()}


def weight_leaves(weights: Weights) -> list[Tensor]:
    """The tensors of ``weights`` in a fixed order (encoder, then head)."""
    return [w for part in weights.values() for w in part.values()]


@contextmanager
def batch_statistics_norm(encoder: nn.Module, enabled: bool) -> Iterator[None]:
    """Batch norm layers of ``encoder`` in train mode (batch statistics) while inside, for
    transductive evaluation; nothing when not ``enabled``."""
    norms = []
    if enabled:
        norms = [
            m
            for m in encoder.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and not m.training
        ]
    for m in norms:
        m.train()
    try:
        yield
    finally:
        for m in norms:
            m.eval()


def non_finite_loss_error(
    losses: Tensor, inner_lr: float, rank: int, world_size: int
) -> ConfigError:
    """One line naming the field and the fix, for the first non-finite loss of ``losses``
    (``(tasks, inner_steps + 1)``); step ``s`` is the loss after ``s`` inner updates (the last
    step: the query loss)."""
    lr = f"inner_lr {inner_lr:g}"
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad) == 0:
        return ConfigError(
            f"model.inner_lr: the inner loop's loss became non-finite on another process "
            f"with {lr}; lower it"
        )
    task, step = (int(v) for v in bad[0])
    value = float(losses[task, step])
    where = f" on process {rank}" if world_size > 1 else ""
    if step == 0:
        return ConfigError(
            f"model.optimizer: the loss was already {value} before any inner step (task "
            f"{task}{where}): the meta-parameters or inputs are not finite; lower the outer "
            "learning rate or check the data"
        )
    return ConfigError(
        f"model.inner_lr: the inner loop's loss became {value} at step {step} of task "
        f"{task}{where} with {lr}; lower it"
    )
