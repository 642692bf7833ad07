"""InfoNCE for aligned pairs: open_clip's ``ClipLoss``, plus label-aware positives.

``ClipLoss(gather_with_grad=True, rank, world_size)`` gathers the features of every rank (with
gradients), so under DDP each rank's negatives are the global batch. The label-aware variant
reuses ClipLoss's own gathering (``get_logits``) and gathers the labels the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch import Tensor


def multi_positive_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """``-mean_i mean_{p in P_i} log softmax(logits_i)_p``: every positive of row ``i`` counts
    as a target (SupCon's L_out form, Khosla et al. 2020). Equals cross-entropy when ``P``
    is the identity."""
    log_prob = logits.log_softmax(dim=1)
    return -((log_prob * positives).sum(1) / positives.sum(1)).mean()


class AlignmentLoss(ClipLoss):
    """Symmetric InfoNCE on ``logit_scale * a @ b.T``; with ``labels``, every pair sharing a
    class is a positive (a multi-positive InfoNCE); without, the pair on the diagonal.

    Example::

        loss_fn = AlignmentLoss(gather_with_grad=True, rank=rank, world_size=world_size)
        loss = loss_fn(image_emb, text_emb, logit_scale.exp(), labels=batch["label"])
    """

    def forward(  # type: ignore[override]
        self,
        a: Tensor,
        b: Tensor,
        logit_scale: Tensor,
        labels: Tensor | None = None,
    ) -> Tensor:
        if labels is None:
            return super().forward(a, b, logit_scale)
        logits_a, logits_b = self.get_logits(a, b, logit_scale)
        # Column labels: the global batch when features were gathered, else the local one.
        columns = gather_labels(labels, self.world_size) if self.world_size > 1 else labels
        rows = labels if self.local_loss else columns
        positives = (rows[:, None] == columns[None, :]).to(logits_a.dtype)
        return (
            multi_positive_cross_entropy(logits_a, positives)
            + multi_positive_cross_entropy(logits_b, positives)
        ) / 2


def gather_labels(labels: Tensor, world_size: int) -> Tensor:
    """All ranks' labels, concatenated in rank order (as the features are)."""
    parts = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)
