"""Learning without Forgetting for language models: distil the previous model's next-token
distributions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import StrategyHost
from mneme.callbacks.strategies.self_distillation import SelfDistillation
from torch import Tensor, nn

IGNORE_INDEX = -100


class LanguageModel(StrategyHost, Protocol):
    """A module over a Hugging Face causal LM ``lm`` whose training ``outputs`` hold token
    ``logits`` (B, T, V) (:class:`mneme.app.ContinualLM`)."""

    lm: Any


class TokenLwF(SelfDistillation):
    """LwF (Li & Hoiem 2016) on token logits, as a loss term ``lwf``: at the start of each
    experience ``k > 0`` a frozen copy of the language model (adapters included) becomes
    the teacher; every training batch adds

        ``alpha * T² · mean_t KL(softmax(teacher_t / T) ‖ softmax(student_t / T))``

    over the scored next-token positions (``labels != -100``), the classification LwF with
    the vocabulary as the classes (every token is an "old class"). The teacher's weights are
    in the state (see :class:`SelfDistillation`), so a resumed run distils toward the same one.

    Args:
        alpha: weight of the distillation; a list gives one weight per experience.
        temperature: softmax temperature ``T``.
    """

    term_name = "lwf"
    needs = LanguageModel

    def __init__(self, alpha: float | Sequence[float] = 1.0, temperature: float = 2.0) -> None:
        if temperature <= 0:
            raise ConfigError(f"TokenLwF.temperature: must be positive, got {temperature}")
        super().__init__()
        self.alpha = list(alpha) if isinstance(alpha, Sequence) else alpha
        if min(self.alpha if isinstance(self.alpha, list) else [self.alpha], default=0) < 0:
            raise ConfigError(f"TokenLwF.alpha: must be non-negative, got {alpha}")
        self.temperature = temperature

    def weight(self, experience: int) -> float:
        if isinstance(self.alpha, list):
            return self.alpha[min(experience, len(self.alpha) - 1)]
        return self.alpha

    def teacher_modules(self, pl_module: LightningModule) -> nn.Module:
        return pl_module.lm

    def distillation(self, batch: dict, outputs: dict) -> Tensor:
        student = outputs["logits"]
        if self.teacher is None:
            return student.new_zeros(())
        with torch.no_grad():
            teacher = self.teacher(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                use_cache=False,
            ).logits
        scored = batch["labels"][:, 1:] != IGNORE_INDEX
        t = self.temperature
        log_p = torch.log_softmax(student[:, :-1][scored].float() / t, dim=-1)
        q = torch.log_softmax(teacher[:, :-1][scored].float() / t, dim=-1)
        kl = F.kl_div(log_p, q, log_target=True, reduction="batchmean")
        return self.weight(self.experience) * t * t * kl

    @property
    def state_key(self) -> str:
        return self._generate_state_key(temperature=self.temperature)
