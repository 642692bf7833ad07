"""Learning without Forgetting: distil the previous model's outputs on the old classes."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from mneme.callbacks.experience import ExperienceCallback
from torch import Tensor, nn

Batch = dict[str, Tensor]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch (Avalanche's
    ``LearningWithoutForgetting._distillation_loss``, no ``T²`` factor)."""
    log_p = torch.log_softmax(student / temperature, dim=1)
    q = torch.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


class LwF(ExperienceCallback):
    """Learning without Forgetting (Li & Hoiem 2016) as a loss term ``lwf``.

    At the start of each experience ``k > 0`` a frozen copy of the model (``encoder`` and
    ``head``, eval mode, no gradients) becomes the teacher. On every training batch the loss
    gains ``alpha * KD(student, teacher, T)`` computed, as Avalanche's ``LwFPlugin``, only
    over the previously active units: per head (one head, or one per task with a multi-head
    module, each distilled on every sample), the classes seen in experiences ``< k``.

    The teacher's weights and the class mask are in the callback's ``state_dict``, so a run
    resumed in the middle of an experience distils toward the same teacher; at an experience
    start the teacher is taken again from the model, which a boundary checkpoint restores.

    Expects a ``ContinualClassifier``-like module: ``encoder``, ``head`` (all heads in one
    ``Linear``), ``num_heads``, ``num_classes``, ``input_key``.

    Args:
        alpha: weight of the distillation; a list gives one weight per experience (indexed
            by the experience being trained, as Avalanche).
        temperature: softmax temperature ``T``.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.LwF
              init_args: {alpha: 1.0, temperature: 2.0}
    """

    def __init__(self, alpha: float | Sequence[float] = 1.0, temperature: float = 2.0) -> None:
        if temperature <= 0:
            raise ValueError(f"LwF.temperature: must be positive, got {temperature}")
        self.alpha = list(alpha) if isinstance(alpha, Sequence) else alpha
        if min(self.alpha if isinstance(self.alpha, list) else [self.alpha], default=0) < 0:
            raise ValueError(f"LwF.alpha: must be non-negative, got {alpha}")
        self.temperature = temperature
        self.teacher: nn.Module | None = None
        self.experience: int | None = None  # the experience the teacher serves
        self.previous_classes: Tensor | None = None  # (num_heads, num_classes) bool
        self._pl_module: LightningModule | None = None
        self._pending: dict[str, Tensor] | None = None  # teacher weights from a checkpoint
        self._units: list[tuple[int, Tensor]] = []

    # -- the loss term --------------------------------------------------------------------
    def weight(self, experience: int) -> float:
        if isinstance(self.alpha, list):
            return self.alpha[min(experience, len(self.alpha) - 1)]
        return self.alpha

    def distillation(self, batch: Batch, outputs: dict[str, Tensor]) -> Tensor:
        """The loss term: ``alpha * Σ_heads KD(student, teacher)`` over previous classes."""
        if self.teacher is None or not self._units:
            return outputs["logits"].new_zeros(())
        module = self._pl_module
        with torch.no_grad():
            teacher = self.teacher_logits(batch[module.input_key])
        if module.num_heads == 1:
            student = outputs["logits"].unsqueeze(1)  # old classes are seen, so unmasked
        else:
            student = module.head(outputs["features"]).view_as(teacher)
        loss = sum(
            distillation_loss(
                student[:, head].index_select(1, units),
                teacher[:, head].index_select(1, units),
                self.temperature,
            )
            for head, units in self._units
        )
        return self.weight(self.experience) * loss

    def teacher_logits(self, x: Tensor) -> Tensor:
        """Raw logits of the teacher, ``(N, num_heads, num_classes)``."""
        logits = self.teacher.head(self.teacher.encoder(x))
        return logits.view(len(logits), self._pl_module.num_heads, -1)

    # -- the teacher ----------------------------------------------------------------------
    def snapshot(self, pl_module: LightningModule) -> nn.Module:
        """A frozen copy of the modules that produce the logits."""
        teacher = copy.deepcopy(
            nn.ModuleDict({"encoder": pl_module.encoder, "head": pl_module.head})
        )
        teacher.eval().requires_grad_(False)
        return teacher

    def set_teacher(
        self, pl_module: LightningModule, experience: int, previous_classes: Tensor
    ) -> None:
        self._pl_module = pl_module
        self.teacher = self.snapshot(pl_module)
        self.experience = experience
        self.previous_classes = previous_classes.to(pl_module.device)
        self._units = [
            (head, mask.nonzero().squeeze(1))
            for head, mask in enumerate(self.previous_classes)
            if mask.any()
        ]

    @staticmethod
    def classes_before(trainer: Trainer, pl_module: LightningModule, experience: int) -> Tensor:
        """``(num_heads, num_classes)`` mask of the classes of training experiences
        ``< experience``, per head (a sample's task picks its head when there are several)."""
        mask = torch.zeros(pl_module.num_heads, pl_module.num_classes, dtype=torch.bool)
        for exp in trainer.datamodule.train_experiences[:experience]:
            labels = exp.tensors["label"].cpu()
            tasks = exp.tensors.get("task")
            heads = tasks.cpu() if pl_module.num_heads > 1 else torch.zeros_like(labels)
            mask[heads, labels] = True
        return mask

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._pl_module = pl_module
        pl_module.loss_terms["lwf"] = self.distillation

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A teacher restored from a checkpoint: the current module's structure, its weights.
        if self._pending is not None:
            weights, self._pending = self._pending, None
            self.set_teacher(pl_module, self.experience, self.previous_classes)
            self.teacher.load_state_dict(weights)

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        if experience > 0:
            self.set_teacher(
                pl_module, experience, self.classes_before(trainer, pl_module, experience)
            )

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None and self._pending is None:
            return {"experience": None}
        weights = self._pending or {k: v.cpu() for k, v in self.teacher.state_dict().items()}
        return {
            "experience": self.experience,
            "teacher": weights,
            "previous_classes": self.previous_classes.cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.teacher = None
        self._units = []
        self.experience = state_dict["experience"]
        if self.experience is None:
            self._pending = self.previous_classes = None
            return
        self._pending = dict(state_dict["teacher"])
        self.previous_classes = state_dict["previous_classes"]
