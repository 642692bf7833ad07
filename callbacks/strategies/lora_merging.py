"""LoRA merging across domains: fold each domain's LoRA into the weights, or keep one LoRA
that is the running average of the domains' (SLAO-style)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import require
from mneme.callbacks.base import ExperienceCallback
from mneme.callbacks.strategies.olora import LoRAHost
from torch import Tensor

MODES = ("fold", "average")
STATE_VERSION = 1


class LoRAMerging(ExperienceCallback):
    """At the end of each LoRA experience (after the general stage, if any):

    - ``fold``: the LoRA update ``B A · scaling`` is added to the base weights and the
      adapter restarts (``A`` re-initialised, ``B`` zero): every domain adds a low-rank update
      of its own, and the model stays the base architecture (merge-then-reinit, as LoRA
      merging papers do). The optimizer state of the adapter is cleared (its moments belong
      to the old adapter).
    - ``average``: the adapter becomes the running average of the adapters each domain
      ended with, ``θ̄_n = θ̄_{n-1} + (θ_n - θ̄_{n-1}) / n`` (SLAO-style single merged LoRA);
      the next domain starts from that average.

    The running average is in the callback's ``state_dict`` (tensors), the folded weights in
    the module's, both written after this work (the end-of-experience checkpoint).

    Args:
        mode: ``fold`` or ``average``.
    """

    def __init__(self, mode: Literal["fold", "average"] = "fold") -> None:
        if mode not in MODES:
            raise ConfigError(f"LoRAMerging.mode: one of {MODES}, got {mode!r}")
        self.mode = mode
        self.merged: list[int] = []  # experiences done (idempotent after a resume)
        self.average: dict[str, Tensor] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, LoRAHost, "LoRAMerging")
        peft = dict(pl_module.hparams.get("peft") or {})
        if peft.get("method") != "lora":
            raise ConfigError(
                "trainer.callbacks: LoRAMerging needs model.peft {method: lora}; got "
                f"{peft or None}"
            )

    @torch.no_grad()
    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        if experience < pl_module.hparams.get("general_experiences", 0):
            return
        if experience in self.merged:
            return
        if self.mode == "fold":
            self.fold(pl_module, experience)
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
        else:
            self.update_average(pl_module)
        self.merged.append(experience)

    @staticmethod
    def fold(pl_module: LightningModule, experience: int) -> None:
        names = pl_module.lora_adapter_names()
        for layer in pl_module.lora_layers():
            base = layer.get_base_layer()
            for name in names:
                base.weight += layer.get_delta_weight(name).to(base.weight.dtype)
        for name in names:  # restarted from a seeded draw: the same after a resume
            pl_module.restart_lora(name, 10_000 + experience)

    def update_average(self, pl_module: LightningModule) -> None:
        n = len(self.merged) + 1
        for key, p in pl_module.named_parameters():
            if "lora_" not in key:
                continue
            mean = self.average.get(key)
            mean = (
                p.detach().clone() if mean is None else mean.to(p) + (p.detach() - mean.to(p)) / n
            )
            self.average[key] = mean
            p.copy_(mean)

    # -- state ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "merged": list(self.merged),
            "average": {k: v.cpu() for k, v in self.average.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.merged = list(state_dict["merged"])
        self.average = dict(state_dict["average"])
