"""Cross-modal retrieval Recall@K and zero-shot class embeddings.

Why a small torchmetrics ``Metric`` rather than ``torchmetrics.retrieval.RetrievalRecall``:
retrieval here ranks the *whole* gallery (every test embedding, from every rank) for each
query, so the similarity matrix can only be formed at ``compute`` time from the gathered
embeddings; RetrievalRecall wants flattened ``(query, document)`` scores up front (N² entries
and an ``indexes`` tensor), and would still need the same gathered embeddings. Keeping the
embeddings as ``cat`` states gives the DDP sync for free; ``compute`` ranks in query chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mneme.app.core.errors import ConfigError
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class CrossModalRecall(Metric):
    """Recall@K in both directions between paired embeddings ``a[i] <-> b[i]``.

    A query hits at K when a positive is among its K most similar gallery items (cosine of
    normalized embeddings; ties counted in the query's favour). Positives: the paired item
    (``by_label=False``, COCO-style), or every item of the same class (``by_label=True``,
    for streams whose captions repeat per class).

    ``compute()`` returns ``(2, len(ks))``: row 0 ``a -> b``, row 1 ``b -> a``.

    Example::

        recall = CrossModalRecall(ks=(1, 5, 10))
        recall.update(image_emb, text_emb, labels)
        (i2t, t2i) = recall.compute()
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self, ks: Sequence[int] = (1, 5, 10), by_label: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not ks or min(ks) < 1:
            raise ConfigError(f"model.recall_ks: positive integers, got {list(ks)}")
        self.ks = tuple(int(k) for k in ks)
        self.by_label = by_label
        self.add_state("a", default=[], dist_reduce_fx="cat")
        self.add_state("b", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, a: Tensor, b: Tensor, labels: Tensor | None = None) -> None:
        if a.shape != b.shape:
            raise ValueError(f"paired embeddings differ in shape: {tuple(a.shape)} vs {b.shape}")
        self.a.append(a.detach().float())
        self.b.append(b.detach().float())
        self.labels.append(
            labels.detach() if labels is not None else torch.full((len(a),), -1, device=a.device)
        )

    def compute(self) -> Tensor:
        a, b, labels = dim_zero_cat(self.a), dim_zero_cat(self.b), dim_zero_cat(self.labels)
        keys = labels if self.by_label else torch.arange(len(a), device=a.device)
        return torch.stack([self._recall(a, b, keys), self._recall(b, a, keys)])

    def _recall(self, queries: Tensor, gallery: Tensor, keys: Tensor, chunk: int = 1024) -> Tensor:
        hits = torch.zeros(len(self.ks), device=queries.device)
        ks = torch.tensor(self.ks, device=queries.device)
        for start in range(0, len(queries), chunk):
            sim = queries[start : start + chunk] @ gallery.T
            positive = keys[start : start + chunk, None] == keys[None, :]
            best = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
            rank = (sim > best).sum(dim=1)  # gallery items strictly better than a positive
            hits += (rank[:, None] < ks[None, :]).sum(dim=0)
        return hits / max(len(queries), 1)


def class_embeddings(encoder: torch.nn.Module, tokens: Tensor) -> Tensor:
    """Zero-shot classifier weights from prompt tokens ``(C, T, L)`` (``C`` classes, ``T``
    templates): the mean of each class's normalized template embeddings, re-normalized
    (CLIP's prompt ensembling). Returns ``(C, D)``."""
    num_classes, num_templates, length = tokens.shape
    emb = encoder(tokens.reshape(num_classes * num_templates, length))
    emb = F.normalize(emb, dim=-1).view(num_classes, num_templates, -1).mean(dim=1)
    return F.normalize(emb, dim=-1)
