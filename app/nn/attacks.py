"""Adversarial examples (FGSM, PGD under L-inf and L2) in pixel space.

Written by hand: the attack loop is a few lines of autograd and no installed library
(timm, torchmetrics, torch) ships one; it follows Madry et al. 2018 (PGD) and Goodfellow et
al. 2015 (FGSM). The perturbation lives in ``[0, 1]`` pixel space: a stream standardized with
``(mean, std)`` is undone first (``x * std + mean``), perturbed and clamped to ``[0, 1]``
there, and standardized again before the model sees it, so ``eps`` is in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from mneme.app.core.errors import ConfigError
from mneme.app.nn.soft_targets import soft_cross_entropy
from torch import Tensor

NORMS = ("linf", "l2")


def check_attack(who: str, eps: float, steps: int, step_size: float | None, norm: str) -> None:
    """One-line ``ConfigError`` naming the field of a bad attack setting."""
    if not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"{who}.eps: the perturbation budget must be >= 0, got {eps}")
    if norm == "linf" and eps >= 1:
        # pixels lie in [0, 1]: a budget of 1 or more may replace the whole image, so every
        # prediction can be made wrong and the robust accuracy reads 0 whatever the model
        raise ConfigError(
            f"{who}.eps: an L-inf budget in [0, 1] pixel space must be below 1 (e.g. 8/255 "
            f"= 0.031), got {eps}"
        )
    if steps < 1:
        raise ConfigError(
            f"{who}.steps: at least 1 (1 with random_start false is FGSM), got {steps}"
        )
    if step_size is not None and (not math.isfinite(step_size) or step_size <= 0):
        raise ConfigError(f"{who}.step_size: must be > 0 (e.g. 2.5 * eps / steps), got {step_size}")
    if norm not in NORMS:
        raise ConfigError(f"{who}.norm: one of {list(NORMS)}, got '{norm}'")


def _stats(normalization: Sequence | None, x: Tensor) -> tuple[Tensor, Tensor] | None:
    if normalization is None:
        return None
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in normalization)
    shape = (1, -1) + (1,) * (x.dim() - 2) if mean.dim() == 1 and mean.numel() > 1 else ()
    return (mean.view(shape), std.view(shape)) if shape else (mean, std)


def _flat_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta)).clamp(max=1.0)


def pgd(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    normalization: Sequence | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Inputs that maximise ``loss_fn(model_input)`` within the ``eps``-ball around ``x``.

    ``x`` is the model's input (standardized by ``normalization = (mean, std)`` when given);
    the result is too, its pixel version in ``[0, 1]`` and within ``eps`` (L-inf or L2) of
    ``x``'s. ``steps=1, random_start=False, step_size=eps`` is FGSM (L-inf: the gradient's
    sign; L2: the normalised gradient). ``step_size`` defaults to ``2.5 * eps / steps``
    (Madry et al.), ``eps`` for one step. Only ``x``'s gradient is taken: parameter
    gradients are left untouched.
    """
    check_attack("attack", eps, steps, step_size, norm)
    stats = _stats(normalization, x)
    pixels = (x.detach() * stats[1] + stats[0]) if stats else x.detach()
    pixels = pixels.clamp(0, 1)
    if step_size is None:
        step_size = eps if steps == 1 else 2.5 * eps / steps
    if random_start and eps > 0:
        noise = torch.rand(pixels.shape, generator=generator, dtype=pixels.dtype)
        delta = (noise.to(pixels.device) * 2 - 1) * eps
        if norm == "l2":
            delta = _project(delta, eps, norm)
    else:
        delta = torch.zeros_like(pixels)
    delta = ((pixels + delta).clamp(0, 1) - pixels).detach()
    for _ in range(steps if eps > 0 else 0):
        delta.requires_grad_(True)
        adv = pixels + delta
        model_input = (adv - stats[0]) / stats[1] if stats else adv
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(model_input), delta)
        with torch.no_grad():
            step = grad.sign() if norm == "linf" else grad / _flat_norm(grad)
            delta = _project(delta + step_size * step, eps, norm)
            delta = (pixels + delta).clamp(0, 1) - pixels
    adv = (pixels + delta).detach()
    return ((adv - stats[0]) / stats[1] if stats else adv).to(x.dtype)


def fgsm(loss_fn: Callable[[Tensor], Tensor], x: Tensor, eps: float, **kwargs) -> Tensor:
    """Fast gradient sign method: one full step of ``eps``, no random start."""
    return pgd(loss_fn, x, eps, steps=1, step_size=eps, random_start=False, **kwargs)


def classification_loss(logits: Tensor, label: Tensor, soft_label: Tensor | None = None) -> Tensor:
    """Cross-entropy on hard labels, or on soft ones (masked classes dropped)."""
    if soft_label is None:
        return F.cross_entropy(logits, label)
    return soft_cross_entropy(logits, soft_label)
