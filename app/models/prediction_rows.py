"""The rows a module's ``predict_step`` returns: one plain dict per sample, which
:class:`mneme.callbacks.PredictionWriter` writes as a JSON line."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# How many classes a row lists when no PredictionWriter set ``predict_top_k``.
DEFAULT_TOP_K = 5


def class_rows(
    logits: Tensor, top_k: int, batch: dict[str, Any], with_task: bool = False
) -> list[dict[str, Any]]:
    """Per sample: ``predicted`` (the argmax of ``logits``, as validation scores it), the
    ``top_k`` most probable classes and their softmax probabilities (classes the model masks,
    e.g. not seen yet, are left out), the true ``label`` when the batch has one, and the
    ``task`` (each sample's head) when ``with_task``."""
    logits = logits.detach().float()
    available = logits > torch.finfo(logits.dtype).min
    probabilities = logits.softmax(dim=1)
    k = min(top_k, logits.shape[1])
    top = probabilities.topk(k, dim=1)
    predicted = logits.argmax(dim=1).tolist()
    classes, values = top.indices.tolist(), top.values.tolist()
    shown = available.gather(1, top.indices).tolist()
    labels = batch["label"].tolist() if "label" in batch else None
    tasks = batch["task"].tolist() if with_task and "task" in batch else None
    rows = []
    for i, guess in enumerate(predicted):
        row: dict[str, Any] = {"predicted": guess}
        if labels is not None:
            row["label"] = labels[i]
        if tasks is not None:
            row["task"] = tasks[i]
        keep = [j for j in range(k) if shown[i][j]]
        row["top_classes"] = [classes[i][j] for j in keep]
        row["top_probabilities"] = [round(values[i][j], 6) for j in keep]
        rows.append(row)
    return rows
