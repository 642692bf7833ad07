"""Reading a meta-batch of :class:`~mneme.datamodules.fewshot.datamodule.EpisodicDataModule`
(``support`` / ``query`` ``{field: (T, N*K | N*Q, *shape)}``, ``classes`` ``(T, N)``,
optional ``padded`` ``(T,)``), and the per-episode accuracy metrics every few-shot module
fills and :class:`mneme.callbacks.FewShotMetrics` reports. No Lightning here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import CatMetric

Episodes = dict[str, Any]


def encode_episodes(
    encode: Callable[[Tensor], Tensor], batch: Episodes, key: str
) -> tuple[Tensor, Tensor]:
    """Embeddings of a meta-batch's support ``(T, N*K, D)`` and query ``(T, N*Q, D)``
    samples of field ``key``, in one pass of ``encode`` over all ``T`` tasks."""
    support, query = batch["support"][key], batch["query"][key]
    t, nk, nq = support.shape[0], support.shape[1], query.shape[1]
    x = torch.cat([support.flatten(0, 1), query.flatten(0, 1)])
    z = encode(x)
    return z[: t * nk].view(t, nk, -1), z[t * nk :].view(t, nq, -1)


def n_way_of(batch: Episodes) -> int:
    """The episodes' ``N`` (``classes`` is ``(T, N)``)."""
    return int(batch["classes"].shape[1])


def kept_episodes(batch: Episodes) -> Tensor | None:
    """Which episodes count (``None``: all): a loader that pads the last batches of a rank
    with repeated episodes may flag them in ``batch["padded"]`` ``(T,)``."""
    padded = batch.get("padded")
    return None if padded is None else ~padded.bool()


def record_accuracies(metric: CatMetric, correct: Tensor, batch: Episodes) -> None:
    """Add each episode's query accuracy (``correct`` ``(T, N*Q)`` bool) to ``metric``."""
    accuracy = correct.float().mean(dim=1)
    keep = kept_episodes(batch)
    metric.update(accuracy if keep is None else accuracy[keep.to(accuracy.device)])


def episode_metrics(count: int) -> nn.ModuleList:
    """``count`` fresh ``CatMetric``\\ s of per-episode accuracies (synced across ranks)."""
    return nn.ModuleList(CatMetric(nan_strategy="error") for _ in range(count))


def eval_settings_of(datamodule: Any) -> list[tuple[int, int]]:
    """The datamodule's evaluation settings ``[(n_way, k_shot), ...]`` (one test loader
    each); its training setting when it declares none."""
    settings = getattr(datamodule, "eval_settings", None)
    if not settings:
        settings = [(datamodule.n_way, datamodule.k_shot)]
    return [(int(n), int(k)) for n, k in settings]
