"""Feature distillation for continual alignment: keep embeddings near the previous model's."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import Embedder
from mneme.callbacks.strategies.self_distillation import SelfDistillation
from torch import Tensor, nn

Batch = dict[str, Tensor]
DISTANCES = ("cosine", "l2")


def embedding_distance(student: Tensor, teacher: Tensor, distance: str) -> Tensor:
    """Mean over rows of ``1 - cos`` or of the squared L2 distance (normalized inputs)."""
    if distance == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
    return (student - teacher).pow(2).sum(-1).mean()


class FeatureDistillation(SelfDistillation):
    """Distil the embeddings toward a frozen copy of the model taken at each experience
    start, as a loss term ``feature_distillation`` (in the spirit of ZSCL, Zheng et al. 2023).

    On every training batch: ``alpha * mean_m d(student_m, teacher_m)`` over the modalities
    the module embedded (``outputs["embeddings"]``, replayed samples included), plus
    ``prompt_alpha * d(student, teacher)`` on the class-prompt text embeddings (zero-shot
    classifier weights), which protects the zero-shot head without any data of past classes.

    The teacher's weights (tensors) are in the callback's ``state_dict``, so a run resumed
    mid-experience distils toward the same teacher. Expects a ``ContrastiveAligner``-like
    module: ``encoders`` (a ``ModuleDict``), and for prompts ``class_embeddings(encoder)``
    and ``text_key``.

    Args:
        alpha: weight of the embedding distillation.
        prompt_alpha: weight of the class-prompt distillation (0: off).
        distance: ``cosine`` (``1 - cos``) or ``l2`` (squared distance).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.FeatureDistillation
              init_args: {alpha: 1.0, prompt_alpha: 1.0, distance: cosine}
    """

    term_name = "feature_distillation"
    needs = Embedder

    def __init__(
        self,
        alpha: float = 1.0,
        prompt_alpha: float = 0.0,
        distance: Literal["cosine", "l2"] = "cosine",
    ) -> None:
        if distance not in DISTANCES:
            raise ConfigError(f"FeatureDistillation.distance: one of {DISTANCES}, got '{distance}'")
        if alpha < 0 or prompt_alpha < 0:
            raise ConfigError("FeatureDistillation.alpha/prompt_alpha: must be >= 0")
        super().__init__()
        self.alpha = alpha
        self.prompt_alpha = prompt_alpha
        self.distance = distance

    # -- the loss term --------------------------------------------------------------------
    def distillation(self, batch: Batch, outputs: dict[str, Any]) -> Tensor:
        student = outputs["embeddings"]
        zero = next(iter(student.values())).new_zeros(())
        if self.teacher is None:
            return zero
        loss = zero
        if self.alpha:
            with torch.no_grad():
                teacher = {m: self.teacher[m](batch[m]) for m in student}
            terms = [embedding_distance(student[m], teacher[m], self.distance) for m in student]
            loss = loss + self.alpha * torch.stack(terms).mean()
        if self.prompt_alpha:
            module = self._pl_module
            with torch.no_grad():
                target = module.class_embeddings(self.teacher[module.text_key])
            current = module.class_embeddings()
            loss = loss + self.prompt_alpha * embedding_distance(current, target, self.distance)
        return loss

    # -- the teacher ----------------------------------------------------------------------
    def teacher_modules(self, pl_module: LightningModule) -> nn.Module:
        return pl_module.encoders

    def set_teacher(self, pl_module: LightningModule, experience: int) -> None:
        self.take_teacher(pl_module, experience)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(distance=self.distance)
