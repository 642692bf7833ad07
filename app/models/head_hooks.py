"""The glue between a model and its head, shared by the classifier and the fusion model: the
head's training terms, and each Lightning hook calling the head's lifecycle hooks
(:mod:`mneme.app.nn.heads.lifecycle`), which do nothing for a plain head."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from mneme.app.core.protocols import SOFT_LABEL
from mneme.app.core.schedule import current_experience, is_experience_start
from mneme.app.nn.heads.lifecycle import HeadLifecycle, lifecycle
from mneme.app.nn.soft_targets import soft_cross_entropy
from torch import Tensor, nn

HEAD_PREFIX = "head."  # the head's keys in the model's state_dict (its attribute ``head``)


class HeadHooks:
    """Mixin for a ContinualModule with a ``head`` attribute (listed before the module's base
    class, so that its Lightning hooks run first and then call the base's)."""

    head: nn.Module

    @property
    def head_hooks(self) -> HeadLifecycle:
        return lifecycle(self.head)

    def on_train_epoch_start(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        # a new experience's experts (a MoE head), before its first step
        first = is_experience_start(trainer)
        self.head_hooks.start_experience(current_experience(trainer), trainer.optimizers, first)
        super().on_train_epoch_start()  # type: ignore[misc]

    def on_before_optimizer_step(self, optimizer) -> None:
        self.head_hooks.average_outside_ddp()  # parameters made after DDP wrapped the model
        super().on_before_optimizer_step(optimizer)  # type: ignore[misc]

    def end_head_experience(self) -> None:
        """At an experience's last training epoch's end (the head's routing, logged)."""
        trainer = self.trainer  # type: ignore[attr-defined]
        self.head_hooks.log_routing(trainer.loggers, current_experience(trainer))

    def restore_head(self, checkpoint: dict[str, Any]) -> None:
        """Before a checkpoint's weights load: e.g. as many experts as it saved."""
        self.head_hooks.restore(checkpoint.get("state_dict", {}), HEAD_PREFIX)

    def classification_terms(
        self, logits: Tensor, features: Tensor, batch: dict[str, Any]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``training_terms`` of the head's ``logits``: cross-entropy with the labels, or with
        the soft targets when the batch has them (MixUp/CutMix, label smoothing); the outputs
        carry the logits, the ``features`` and what the head adds (MoE's balance loss)."""
        if SOFT_LABEL in batch:
            terms = {"ce": soft_cross_entropy(logits, batch[SOFT_LABEL])}
        else:
            terms = {"ce": F.cross_entropy(logits, batch["label"])}
        outputs = {"logits": logits, "features": features}
        outputs.update(self.head_hooks.step_outputs())
        return terms, outputs

    def optimizer_parameters(self) -> list[Any]:
        """The head's own groups (a group per expert generation, resumable) after one group
        of the module's other trainable parameters; the base's choice when it has none."""
        own = self.head_hooks.param_groups()
        if not own:
            return super().optimizer_parameters()  # type: ignore[misc]
        inside = {id(p) for p in self.head.parameters()}
        parameters = self.parameters()  # type: ignore[attr-defined]
        rest = [p for p in parameters if p.requires_grad and id(p) not in inside]
        return ([{"params": rest}] if rest else []) + own
