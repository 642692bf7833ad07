"""The teacher lifecycle shared by the self-distillation strategies (LwF, FeatureDistillation)."""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.protocols import StrategyHost, require
from mneme.callbacks.base import ExperienceCallback
from torch import nn

# 1: the layout of mneme 0.1.0 plus this field (0.1.0's checkpoints, without it, load as is).
STATE_VERSION = 1


class SelfDistillation(ExperienceCallback):
    """Base of the strategies that distil toward a frozen copy of the model, taken at the
    start of each experience ``k > 0``, as the loss term ``term_name``.

    It owns the teacher's life: the copy (eval mode, no gradients, kept in eval mode while
    Lightning puts the module in train mode), its weights in ``state_dict`` (so a run
    resumed mid-experience distils toward the same teacher; at an experience start the
    teacher is taken again from the model, which a boundary checkpoint restores), and the
    registration of the loss term, removed at ``teardown``. The module must follow
    ``needs`` (checked at fit start).

    Subclasses define :meth:`teacher_modules` (what to copy), :meth:`distillation` (the loss
    term) and, for state of their own that goes with the teacher, :meth:`on_new_teacher`,
    :meth:`extra_state` and :meth:`load_extra_state`.
    """

    term_name = "distillation"
    needs: type = StrategyHost

    def __init__(self) -> None:
        self.teacher: nn.Module | None = None
        self.experience: int | None = None  # the experience the teacher serves
        self._pl_module: LightningModule | None = None
        self._pending: dict[str, Any] | None = None  # teacher weights from a checkpoint
        self._term: str | None = None  # the name the module gave our loss term

    # -- what subclasses define -----------------------------------------------------------
    def teacher_modules(self, pl_module: LightningModule) -> nn.Module:
        """The part of the module to copy as the teacher."""
        raise NotImplementedError

    def distillation(self, batch: dict, outputs: dict) -> Any:
        raise NotImplementedError

    def on_new_teacher(self, trainer: Trainer | None, pl_module: LightningModule) -> None:
        """Called when the teacher was just taken (or restored): update derived state."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # -- the teacher ----------------------------------------------------------------------
    def take_teacher(self, pl_module: LightningModule, experience: int) -> None:
        self._pl_module = pl_module
        self.teacher = copy.deepcopy(self.teacher_modules(pl_module))
        self.teacher.eval().requires_grad_(False)
        self.experience = experience

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._pl_module = pl_module
        require(pl_module, StrategyHost, type(self).__name__)
        self._term = pl_module.add_loss_term(self.term_name, self.distillation)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        require(pl_module, self.needs, type(self).__name__)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._term is not None:
            pl_module.remove_loss_term(self._term)
            self._term = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is not None:  # restored: the module's structure, the stored weights
            weights, self._pending = self._pending, None
            self.take_teacher(pl_module, self.experience)
            self.teacher.load_state_dict(weights)
            self.on_new_teacher(trainer, pl_module)

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        if experience > 0:
            self.take_teacher(pl_module, experience)
            self.on_new_teacher(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning puts the module (not the teacher) in train mode

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None and self._pending is None:
            return {"version": STATE_VERSION, "experience": None}
        weights = self._pending or {k: v.cpu() for k, v in self.teacher.state_dict().items()}
        return {
            "version": STATE_VERSION,
            "experience": self.experience,
            "teacher": weights,
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.teacher = None
        self.experience = state_dict["experience"]
        self._pending = dict(state_dict["teacher"]) if self.experience is not None else None
        self.load_extra_state(state_dict)
