"""The schedule and mask arithmetic behind :class:`~mneme.callbacks.compression.pruning.Pruning`:
the cubic sparsity schedule, which layers are prunable, magnitude pruning to a sparsity
among the surviving weights (``torch.nn.utils.prune``), attention-head masks, and the
sparsity report. Plain torch: the callback decides when; this module decides what."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}
HEAD_PARAMS = ("in_proj_weight", "in_proj_bias")


def cubic_sparsity(target: float, step: int, steps: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) (1 - t/n)^3`` after step ``t`` of ``n``."""
    return target + (initial - target) * (1 - step / steps) ** 3


def layer_sparsity(module: nn.Module) -> float:
    """Fraction of zeros of ``module.weight`` (the masked weight when pruned)."""
    weight = module.weight
    return float((weight == 0).sum()) / weight.numel()


def is_excluded(name: str, exclude: list[str]) -> bool:
    """``name`` is one of ``exclude`` or inside one of them."""
    return any(name == e or name.startswith(e + ".") for e in exclude)


def attention_out_projections(module: nn.Module) -> set[str]:
    """Names of the ``out_proj`` of every ``nn.MultiheadAttention`` (never pruned as a
    Linear: torch reads their weight without calling them, so a prune mask would not apply)."""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, m in module.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def prunable_layers(
    module: nn.Module, layer_types: list[str], exclude: list[str]
) -> dict[str, nn.Module]:
    """The layers of ``layer_types`` outside ``exclude`` (and no attention ``out_proj``)."""
    kinds = tuple(LAYER_TYPES[t] for t in layer_types)
    attention = attention_out_projections(module)
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, kinds)
        and name
        and name not in attention
        and not is_excluded(name, exclude)
    }


def prunable_attention(module: nn.Module, exclude: list[str]) -> dict[str, nn.MultiheadAttention]:
    """The ``nn.MultiheadAttention`` modules outside ``exclude``, by name."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.MultiheadAttention) and name and not is_excluded(name, exclude)
    }


def current_mask(module: nn.Module) -> Tensor:
    """``module``'s weight mask (all ones when it is not pruned)."""
    return module.weight_mask if prune.is_pruned(module) else torch.ones_like(module.weight)


@torch.no_grad()
def prune_layers_to(
    layers: dict[str, nn.Module], sparsity: float, method: str, scope: str, dim: int, norm: int
) -> dict[str, Tensor]:
    """Prune ``layers`` to ``sparsity`` among the surviving weights (never un-pruning one):
    ``structured`` slices along ``dim`` by their L``norm`` norm per layer, else by ``|w|``,
    ranked over all layers (``scope: global``) or per layer. Returns the bool masks."""
    if method == "structured":
        for m in layers.values():
            slices = m.weight.shape[dim]
            pruned = int(current_mask(m).transpose(0, dim).flatten(1).eq(0).all(1).sum())
            extra = round(sparsity * slices) - pruned
            if extra > 0:
                prune.ln_structured(m, "weight", amount=extra, n=norm, dim=dim)
    elif scope == "global":
        total = sum(m.weight.numel() for m in layers.values())
        pruned = sum(int((current_mask(m) == 0).sum()) for m in layers.values())
        extra = round(sparsity * total) - pruned
        if extra > 0:
            prune.global_unstructured(
                [(m, "weight") for m in layers.values()],
                pruning_method=prune.L1Unstructured,
                amount=extra,
            )
    else:
        for m in layers.values():
            extra = round(sparsity * m.weight.numel()) - int((current_mask(m) == 0).sum())
            if extra > 0:
                prune.l1_unstructured(m, "weight", amount=extra)
    zero_pruned(layers)
    return {n: m.weight_mask.bool().cpu() for n, m in layers.items() if prune.is_pruned(m)}


@torch.no_grad()
def prune_heads_to(
    attention: dict[str, nn.MultiheadAttention],
    head_masks: dict[str, Tensor],
    sparsity: float,
    norm: int,
) -> None:
    """Prune each attention's heads to ``sparsity`` (a fraction of its heads) among the
    surviving ones, by the joint L``norm`` norm of their q/k/v rows; ``head_masks`` (name ->
    bool mask of the live heads) is updated in place."""
    # Hand-written: torch prune ranks slices of one tensor, and a head is three row
    # blocks (q, k, v) of in_proj_weight plus its bias; the mask is built here and
    # applied with prune.custom_from_mask, so removal and checkpoints work as for Linears.
    for name, m in attention.items():
        heads, dim = m.num_heads, m.head_dim
        alive = head_masks.get(name, torch.ones(heads, dtype=torch.bool)).clone()
        weight = m.in_proj_weight.detach().view(3, heads, dim, -1)
        score = weight.abs().pow(norm).sum(dim=(0, 2, 3))  # L_n^n: same order
        score = score.cpu().masked_fill(~alive, float("-inf"))
        extra = round(sparsity * heads) - int((~alive).sum())
        if extra > 0:
            order = torch.argsort(score)  # pruned heads (-inf) first, then the weakest
            alive[order[: int((~alive).sum()) + extra]] = False
        head_masks[name] = alive
        mask_heads(m, alive)


@torch.no_grad()
def mask_heads(m: nn.MultiheadAttention, alive: Tensor) -> None:
    """Mask the q/k/v rows (and biases) of ``m``'s dead heads with ``prune.custom_from_mask``."""
    rows = alive.to(m.in_proj_weight.device).repeat_interleave(m.head_dim).repeat(3)
    for param in HEAD_PARAMS:
        if getattr(m, param) is None:
            continue
        if prune.is_pruned(m) and hasattr(m, param + "_mask"):
            prune.remove(m, param)  # the new mask replaces (and contains) the old one
        shape = getattr(m, param).shape
        mask = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape).float()
        prune.custom_from_mask(m, param, mask)
        getattr(m, param + "_orig").mul_(mask)


@torch.no_grad()
def zero_pruned(layers: dict[str, nn.Module]) -> None:
    """Zero the pruned weights in ``weight_orig`` too."""
    # The plain state_dict written at a checkpoint (weight_orig * mask) then equals
    # weight_orig, and a resume is exact.
    for m in layers.values():
        if prune.is_pruned(m):
            m.weight_orig.mul_(m.weight_mask)


def remove_pruning(
    layers: dict[str, nn.Module], attention: dict[str, nn.MultiheadAttention]
) -> None:
    """``prune.remove`` on every pruned layer and attention: plain Parameters, zeros kept."""
    for m in layers.values():
        if prune.is_pruned(m):
            prune.remove(m, "weight")
    for m in attention.values():
        for param in HEAD_PARAMS:
            if hasattr(m, param + "_mask"):
                prune.remove(m, param)


def head_sparsity_report(head_masks: dict[str, Tensor]) -> dict[str, float]:
    """``prune/<attention>``: the fraction of its heads pruned; ``prune/heads``: over all."""
    out = {f"prune/{n}": 1 - float(a.float().mean()) for n, a in head_masks.items()}
    total = sum(len(a) for a in head_masks.values())
    dead = sum(int((~a).sum()) for a in head_masks.values())
    out["prune/heads"] = dead / max(total, 1)
    return out


def layer_sparsity_report(layers: dict[str, nn.Module]) -> dict[str, float]:
    """``prune/<layer>``: each layer's sparsity; ``prune/sparsity``: over all of them."""
    out = {f"prune/{n}": layer_sparsity(m) for n, m in layers.items()}
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    out["prune/sparsity"] = zeros / max(sum(m.weight.numel() for m in layers.values()), 1)
    return out
