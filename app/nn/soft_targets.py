"""Cross-entropy with soft targets (MixUp's, label smoothing's), for the classifiers and the
adversarial attacks. Apart from :mod:`mneme.app.nn.losses`, which loads open_clip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with soft targets; classes whose logits are masked (the dtype's minimum,
    unseen classes) get no target mass, the rest renormalised (label smoothing would
    otherwise put mass on a class the model cannot predict and make the loss explode)."""
    available = logits > torch.finfo(logits.dtype).min
    target = target.to(logits.dtype) * available
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)
    log_p = F.log_softmax(logits, dim=1).masked_fill(~available, 0.0)
    return -(target * log_p).sum(dim=1).mean()
