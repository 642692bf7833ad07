"""Learning without Forgetting: distil the previous model's outputs on the old classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import Classifier
from mneme.callbacks.strategies.self_distillation import SelfDistillation
from torch import Tensor, nn

Batch = dict[str, Tensor]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch (Avalanche's
    ``LearningWithoutForgetting._distillation_loss``, no ``T²`` factor)."""
    log_p = torch.log_softmax(student / temperature, dim=1)
    q = torch.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


class LwF(SelfDistillation):
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

    term_name = "lwf"
    needs = Classifier

    def __init__(self, alpha: float | Sequence[float] = 1.0, temperature: float = 2.0) -> None:
        if temperature <= 0:
            raise ConfigError(f"LwF.temperature: must be positive, got {temperature}")
        super().__init__()
        self.alpha = list(alpha) if isinstance(alpha, Sequence) else alpha
        if min(self.alpha if isinstance(self.alpha, list) else [self.alpha], default=0) < 0:
            raise ConfigError(f"LwF.alpha: must be non-negative, got {alpha}")
        self.temperature = temperature
        self.previous_classes: Tensor | None = None  # (num_heads, num_classes) bool
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
    def teacher_modules(self, pl_module: LightningModule) -> nn.Module:
        """The modules that produce the logits."""
        return nn.ModuleDict({"encoder": pl_module.encoder, "head": pl_module.head})

    def set_teacher(
        self, pl_module: LightningModule, experience: int, previous_classes: Tensor
    ) -> None:
        """Take the teacher now, to distil on ``previous_classes`` (``(heads, classes)``)."""
        self.previous_classes = previous_classes
        self.take_teacher(pl_module, experience)
        self.on_new_teacher(None, pl_module)

    def on_new_teacher(self, trainer: Trainer | None, pl_module: LightningModule) -> None:
        self.previous_classes = self.previous_classes.to(pl_module.device)
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
            labels = exp.labels().cpu()  # metadata: no sample is read
            heads = exp.task_labels().cpu() if pl_module.num_heads > 1 else torch.zeros_like(labels)
            mask[heads, labels] = True
        return mask

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        if experience > 0:
            self.previous_classes = self.classes_before(trainer, pl_module, experience)
        super().on_experience_start(trainer, pl_module, experience)

    # -- state ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(temperature=self.temperature)

    def extra_state(self) -> dict[str, Any]:
        return {"previous_classes": self.previous_classes.cpu()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._units = []
        self.previous_classes = state.get("previous_classes")
