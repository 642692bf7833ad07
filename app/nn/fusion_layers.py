"""The fusion model's plain-torch layers: each modality encoder's tokens (with a padding
mask) and the pre-norm cross-attention block that fuses them (used by
:class:`mneme.app.models.fusion.FusionClassifier`)."""

from __future__ import annotations

import torch.nn.functional as F
from mneme.app.nn.log_mel import LogMelAudio
from mneme.app.nn.open_clip_towers import OpenClipText
from torch import Tensor, nn


def _feature_map(model: nn.Module, x: Tensor) -> Tensor:
    """A timm model's ``forward_features``; for Mneme's small CNN (no ``forward_features``)
    the layers of its ``features`` before the global pooling; else the model's output."""
    if hasattr(model, "forward_features"):
        out = model.forward_features(x)
        if getattr(model, "output_fmt", "NCHW") == "NHWC" and out.ndim == 4:  # timm's swin
            out = out.permute(0, 3, 1, 2)
        return out
    layers = getattr(model, "features", None)
    if isinstance(layers, nn.Sequential) and any(
        isinstance(m, nn.AdaptiveAvgPool2d) for m in layers
    ):
        for layer in layers:
            if isinstance(layer, nn.AdaptiveAvgPool2d):
                return x
            x = layer(x)
    return model(x)


def _as_tokens(out: Tensor, over_time: bool) -> Tensor:
    """``(N, T, D)`` tokens from a feature map ``(N, C, H, W)`` (one per position, or with
    ``over_time`` one per column: frequency averaged), tokens, or a vector (one token)."""
    if out.ndim == 4:
        return out.mean(dim=2).transpose(1, 2) if over_time else out.flatten(2).transpose(1, 2)
    if out.ndim == 3:
        return out
    return out.flatten(1).unsqueeze(1)  # not len(out): an export keeps the batch dynamic


def encoder_tokens(encoder: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Tokens ``(N, T, D)`` of one modality's encoder (a type of
    :data:`mneme.app.nn.encoder_registry.ENCODER_TYPES`) and its padding mask ``(N, T)`` (``True`` =
    padding) or ``None``."""
    if isinstance(encoder, LogMelAudio):
        spectrogram = encoder.frontend(x)
        # a strategy's spectrogram masks (mneme.callbacks.SpecAugment), as its forward applies
        spectrogram = getattr(encoder, "feature_transform", nn.Identity())(spectrogram)
        return _as_tokens(_feature_map(encoder.backbone, spectrogram), True), None
    if isinstance(encoder, OpenClipText):
        ids = x.long()
        if ids.shape[1] < encoder.context_length:
            ids = F.pad(ids, (0, encoder.context_length - ids.shape[1]))
        tower, before = encoder.tower, encoder.tower.output_tokens
        tower.output_tokens = True  # open_clip's switch for the per-position outputs
        try:
            _, tokens = tower(ids)
        finally:
            tower.output_tokens = before
        tokens = tokens[:, : ids.shape[1]]
        padding = ids == 0
        padding[:, 0] = False  # the start token is never padding: no query sees no key
        return tokens, padding
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None and hasattr(encoder, "adaptation"):  # timm (TimmImage)
        return _as_tokens(_feature_map(backbone, x.float()), False), None
    return _as_tokens(encoder(x), False), None


def masked_mean(tokens: Tensor, padding: Tensor | None) -> Tensor:
    if padding is None:
        return tokens.mean(dim=1)
    keep = (~padding).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention: ``q + MHA(LN(q), LN(kv))``, then ``q + MLP(LN(q))``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, mlp_ratio: int = 2):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = (
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
        )
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_ratio * dim, dim),
        )

    def forward(self, q: Tensor, kv: Tensor, kv_padding: Tensor | None = None) -> Tensor:
        kv = self.norm_kv(kv)
        attended, _ = self.attention(
            self.norm_q(q), kv, kv, key_padding_mask=kv_padding, need_weights=False
        )
        q = q + attended
        return q + self.mlp(self.norm_mlp(q))
