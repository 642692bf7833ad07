"""O-LoRA (Wang et al. 2023): a new LoRA adapter per domain, trained orthogonal to the old
ones, which stay frozen."""

from __future__ import annotations

from typing import Any, Protocol

from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import StrategyHost, require
from mneme.callbacks.base import ExperienceCallback
from torch import Tensor

STATE_VERSION = 1


class LoRAHost(StrategyHost, Protocol):
    """A module with LoRA adapters it can add and freeze (:class:`mneme.app.ContinualLM`
    with ``peft: {method: lora}``)."""

    frozen_adapters: Any

    def lora_layers(self) -> Any: ...

    def lora_adapter_names(self) -> Any: ...

    def add_lora_adapter(self, name: str) -> Any: ...

    def restart_lora(self, name: str, key: int) -> None: ...

    def apply_stage(self, experience: int) -> None: ...


def adapter_name(experience: int) -> str:
    return f"olora_{experience}"


class OLoRA(ExperienceCallback):
    """O-LoRA as a loss term ``olora``: each domain after the first LoRA one trains a new
    adapter ``olora_<k>`` (the ``peft`` spec's rank, targets and scaling), every earlier
    adapter frozen and still active (their updates add up), with the penalty

        ``orthogonal_lambda * Σ_layers Σ_old ‖A_new A_oldᵀ‖²_F``

    (the new adapter's input subspace kept orthogonal to the old ones'), plus
    ``l2_lambda * Σ ‖θ_new‖²`` as in the paper. The first LoRA experience trains the
    module's own adapter (``default``); with ``model.general_experiences`` the general stage
    trains the base weights and no adapter. The new adapter's parameters join the optimizer
    as a group of their own (the module rebuilds the same groups on resume, and recreates
    the checkpoint's adapters before its weights load).

    Args:
        orthogonal_lambda: weight of the orthogonality penalty (the paper's λ1, 0.5).
        l2_lambda: weight of the L2 penalty on the new adapter (the paper's λ2, 0).
    """

    def __init__(self, orthogonal_lambda: float = 0.5, l2_lambda: float = 0.0) -> None:
        if orthogonal_lambda < 0 or l2_lambda < 0:
            raise ConfigError(
                f"OLoRA.orthogonal_lambda / l2_lambda: non-negative, got {orthogonal_lambda}, "
                f"{l2_lambda}"
            )
        self.orthogonal_lambda = orthogonal_lambda
        self.l2_lambda = l2_lambda
        self.current: str | None = None  # the adapter that trains now
        self._module: LightningModule | None = None
        self._term: str | None = None

    # -- the penalty ----------------------------------------------------------------------
    def penalty(self, batch: dict, outputs: dict) -> Tensor:
        module = self._module
        zero = outputs["logits"].new_zeros(())
        if self.current is None or self.current not in module.lora_adapter_names():
            return zero
        old = [n for n in module.lora_adapter_names() if n != self.current]
        total = zero
        for layer in module.lora_layers():
            new = layer.lora_A[self.current].weight  # (r, in)
            for name in old:
                total = total + (new @ layer.lora_A[name].weight.detach().T).square().sum()
            if self.l2_lambda:
                l2 = new.square().sum() + layer.lora_B[self.current].weight.square().sum()
                total = total + self.l2_lambda / max(self.orthogonal_lambda, 1e-12) * l2
        return self.orthogonal_lambda * total

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, LoRAHost, "OLoRA")
        peft = dict(pl_module.hparams.get("peft") or {})
        if peft.get("method") != "lora" or peft.get("merge_each_experience"):
            raise ConfigError(
                "trainer.callbacks: OLoRA needs model.peft {method: lora} (one adapter per "
                f"domain), without merge_each_experience; got {peft or None}"
            )
        self._module = pl_module
        self._term = pl_module.add_loss_term("olora", self.penalty)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._term is not None:
            pl_module.remove_loss_term(self._term)
            self._term = None

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        first = pl_module.hparams.get("general_experiences", 0)
        if experience <= first:  # the general stage, or the first domain: the own adapter
            self.current = pl_module.lora_adapter_names()[0] if experience == first else None
            return
        name = adapter_name(experience)
        if name not in pl_module.lora_adapter_names():
            params = pl_module.add_lora_adapter(name)
            for optimizer in trainer.optimizers:  # the module's groups: one per olora adapter
                optimizer.add_param_group({"params": params})
        pl_module.frozen_adapters = set(pl_module.lora_adapter_names()) - {name}
        pl_module.apply_stage(experience)
        self.current = name

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = state_dict["current"]
