"""Visual Prompt Tuning (VPT; Jia et al., ECCV 2022) for timm Vision Transformers.

Why this is written by hand and not taken from ``peft``: ``peft`` (checked in 0.21.2) ties
prompt and prefix tuning to transformers' language models. ``PeftModel`` looks up the
``word_embeddings`` of a ``transformers.PreTrainedModel`` through ``config.vocab_size``
(``peft_model.py``), ``PromptEmbedding(config, word_embeddings)`` is an ``nn.Embedding`` of
virtual *word* tokens that is concatenated to ``inputs_embeds``, and prefix tuning hands the
base model ``past_key_values``. A timm ``VisionTransformer`` has no word embeddings, takes no
``inputs_embeds`` and keeps no key/value cache, so none of it applies. What VPT needs is
small: learnable tokens inserted after the class/register tokens, and (deep VPT) replaced
before every later block.

How it is attached: the prompts are a child module of the ViT (``vit.visual_prompts``), so
their parameter names live under the model (``visual_prompts.tokens``) and the ViT's
``state_dict``, ``named_parameters`` and timm's ``group_matcher`` keep working; forward hooks
on ``vit.blocks`` insert, replace and finally drop the prompt slice. Everything outside the
blocks (patch embedding, position embedding, final norm, pooling, head) runs unchanged, and
after the last block the tokens have the original layout again: VPT discards the prompts'
outputs. The hooks are bound methods of the prompt module, so ``copy.deepcopy`` (a teacher
snapshot) and pickling carry them to the copy's own prompts; they mutate no Python state,
so ``torch.func.functional_call`` and ``torch.compile`` see a pure function of the tokens.

Not covered: ``forward_intermediates`` / ``get_intermediate_layers`` return block outputs
that still hold the prompt slice (they reshape patch tokens by ``num_prefix_tokens``), and
an ``attn_mask`` or ``is_causal`` passed to the ViT is refused at call time, since a mask
built for the un-prompted sequence no longer fits.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["VisualPrompts", "add_visual_prompts"]

_FIELD = "model.peft.method"
_OTHER_METHODS = "use lora, adapter or bitfit"


class VisualPrompts(nn.Module):
    """The prompt tokens of one ViT: ``tokens`` of shape ``(layers, num_tokens, embed_dim)``,
    one row for shallow VPT, one per block for deep VPT.

    Built and hooked in by :func:`add_visual_prompts`; its methods ``insert``, ``replace``
    and ``drop`` are the hooks.
    """

    def __init__(
        self,
        num_layers: int,
        num_tokens: int,
        embed_dim: int,
        num_prefix_tokens: int,
        init_bound: float,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.tokens = nn.Parameter(
            torch.empty(num_layers, num_tokens, embed_dim, device=device, dtype=dtype)
        )
        # VPT's random init ("xavier_uniform initialization" in KMnP/vpt,
        # src/models/vit_prompt/vit.py): U(-val, val), val = sqrt(6 / (3 * p*p + d)), with p*p
        # the pixels of one patch and d the prompt width. Drawn from the global RNG so the run
        # seed decides it. One draw over all layers has the same distribution as VPT's two
        # (shallow tokens, then the deep ones).
        nn.init.uniform_(self.tokens, -init_bound, init_bound)
        self.dropout = nn.Dropout(dropout)

    def prompts(self, layer: int, x: Tensor) -> Tensor:
        """Layer ``layer``'s tokens for batch ``x``, ``(N, num_tokens, D)``. Dropout comes after
        the expansion, as in VPT, so each sample draws its own mask."""
        tokens = self.tokens[layer].to(x.dtype).expand(x.shape[0], -1, -1)
        return self.dropout(tokens)

    def insert(self, block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """Pre-hook of the first block: ``[prefix, prompts, patches]``."""
        _refuse_masks(kwargs)
        x, *rest = args
        p = self.num_prefix_tokens
        x = torch.cat([x[:, :p], self.prompts(0, x), x[:, p:]], dim=1)
        return (x, *rest), kwargs

    def replace(self, layer: int, block: nn.Module, args: tuple) -> tuple:
        """Pre-hook of block ``layer`` > 0 (deep VPT): this layer's own tokens in the slice."""
        x, *rest = args
        p, n = self.num_prefix_tokens, self.num_tokens
        x = torch.cat([x[:, :p], self.prompts(layer, x), x[:, p + n :]], dim=1)
        return (x, *rest)

    def drop(self, block: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook of the last block: the prompt outputs are discarded."""
        p, n = self.num_prefix_tokens, self.num_tokens
        return torch.cat([output[:, :p], output[:, p + n :]], dim=1)


def _refuse_masks(kwargs: dict[str, Any]) -> None:
    # A mask sized for the un-prompted sequence would silently shift by num_tokens.
    if kwargs.get("attn_mask") is not None or kwargs.get("is_causal", False):
        raise ValueError(
            "visual prompts: attn_mask / is_causal are not supported with prompt tokens "
            "(the mask would not cover them); call the ViT without them"
        )


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _refusal(vit: nn.Module) -> str | None:
    """Why ``vit`` cannot take visual prompts, as the one-line message; ``None`` if it can."""
    name = _model_name(vit)
    missing = [a for a in ("blocks", "num_prefix_tokens", "embed_dim") if not hasattr(vit, a)]
    if missing:
        kind = (
            "is a CNN"
            if any(isinstance(m, nn.Conv2d) for m in vit.modules())
            else f"is not a ViT (no {', '.join(missing)})"
        )
        return (
            f"{_FIELD}: prompt tuning needs a ViT backbone (timm VisionTransformer); "
            f"{name} {kind}: {_OTHER_METHODS}"
        )
    # Only the classes whose blocks see nothing position-dependent besides the tokens: Eva's
    # rotary embedding, BEiT's and relpos ViT's relative position bias are sized for the
    # patch grid and would misalign once prompts sit between prefix and patches.
    if not isinstance(vit, (VisionTransformer, Eva)):
        return (
            f"{_FIELD}: prompt tuning supports timm VisionTransformer (ViT, DeiT) and Eva "
            f"without rotary embeddings; {name} ({type(vit).__name__}) is not one: "
            f"{_OTHER_METHODS}"
        )
    if isinstance(vit, Eva) and vit.rope is not None:
        return (
            f"{_FIELD}: prompt tuning does not support rotary position embeddings; {name} "
            f"uses them (Eva rope): {_OTHER_METHODS}"
        )
    if len(vit.blocks) == 0:
        return f"{_FIELD}: prompt tuning needs at least one transformer block; {name} has none"
    return None


def add_visual_prompts(
    vit: nn.Module, num_tokens: int, deep: bool = False, dropout: float = 0.0
) -> VisualPrompts:
    """Add VPT prompt tokens to a timm ViT in place and return the prompt module.

    Shallow VPT inserts ``num_tokens`` learnable tokens after the prefix (class, register,
    distillation) tokens before the first block; deep VPT also replaces them with each later
    block's own tokens. The prompt outputs are dropped after the last block, so the final
    norm, pooling (``token``, ``avg``, ``map``) and head see the original layout.

    Only adds: the new ``visual_prompts.tokens`` are trainable, and nothing of the ViT is
    frozen here (the caller decides what trains).

    Example::

        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        prompts = add_visual_prompts(vit, num_tokens=10, deep=True)
        vit.requires_grad_(False)
        prompts.requires_grad_(True)
        features = vit(images)  # same shape as without prompts

    Raises:
        ConfigError: ``vit`` is not a supported ViT, ``num_tokens < 1``, ``dropout`` is
            outside ``[0, 1)``, or the ViT already has prompts.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ConfigError(f"model.peft.num_tokens: must be an integer >= 1, got {num_tokens!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.peft.dropout: must be in [0, 1), got {dropout!r}")
    reason = _refusal(vit)
    if reason:
        raise ConfigError(reason)
    if hasattr(vit, "visual_prompts"):
        raise ConfigError(
            f"{_FIELD}: {_model_name(vit)} already has visual prompts; "
            "add_visual_prompts is called once per model"
        )

    blocks = list(vit.blocks)
    patch = vit.patch_embed.feat_ratio(as_scalar=False)  # pixels per token, (h, w)
    embed_dim = int(vit.embed_dim)
    reference = next(vit.parameters(), None)
    prompts = VisualPrompts(
        num_layers=len(blocks) if deep else 1,
        num_tokens=num_tokens,
        embed_dim=embed_dim,
        num_prefix_tokens=int(vit.num_prefix_tokens),
        init_bound=math.sqrt(6.0 / (3 * math.prod(patch) + embed_dim)),
        dropout=dropout,
        device=None if reference is None else reference.device,
        dtype=None if reference is None else reference.dtype,
    )
    # A child added to a model in eval mode would still be training (its dropout on).
    vit.visual_prompts = prompts.train(vit.training)

    blocks[0].register_forward_pre_hook(prompts.insert, with_kwargs=True)
    if deep:
        for layer, block in enumerate(blocks[1:], start=1):
            block.register_forward_pre_hook(partial(prompts.replace, layer))
    blocks[-1].register_forward_hook(prompts.drop)
    return prompts
