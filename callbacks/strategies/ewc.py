"""Elastic Weight Consolidation: a diagonal-Fisher quadratic penalty towards past solutions."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.private_api import foreach_addcmul, foreach_addcmul_, foreach_mul_, foreach_norm
from mneme.app.core.protocols import ZeroShotClassifier, require
from mneme.app.core.seeding import derive_seed, run_seed
from mneme.callbacks.base import ExperienceCallback
from mneme.datamodules.data.experiences import ExperienceData, as_experience
from torch import Tensor, nn

Batch = dict[str, Tensor]
MODES = ("separate", "online")
# 1: the layout of mneme 0.1.0 plus this field (0.1.0's checkpoints, without it, load as is).
STATE_VERSION = 1


class _Quadratic(torch.autograd.Function):
    """The penalty with its gradient through autograd (``decoupled=False``).

    ``½ Σ_i ‖u_i‖²`` with ``u_i = r_i ⊙ θ_i + o_i``, ``r = √(λA)``, ``o = -r ⊙ m``: that is
    ``λ/2 Σ A (θ - m)²``, and its gradient is ``r ⊙ u``. One fused multiply-add and one norm
    forward, one in-place multiply backward, each a single ``torch._foreach_*`` call over all
    parameters (:mod:`mneme.app.core.private_api`), however many experiences are consolidated.
    """

    @staticmethod
    def forward(ctx, roots: list[Tensor], offsets: list[Tensor], *params: Tensor) -> Tensor:
        u = foreach_addcmul(offsets, roots, params)
        ctx.u, ctx.roots = u, roots
        return torch.stack(foreach_norm(u)).square().sum() / 2

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        # In place, and `u` released: autograd may then take these tensors over as the
        # gradient buffers instead of copying them.
        grads, ctx.u = ctx.u, None
        foreach_mul_(grads, ctx.roots)
        # The output gradient is 1 unless the loss is scaled (AMP, accumulation); reading it
        # is free on the CPU, and on an accelerator a multiply is cheaper than a sync. Under
        # torch.compile ``.item()`` would break the graph: multiply (fused, about free).
        compiling = torch.compiler.is_compiling()
        if compiling or grad_output.device.type != "cpu" or grad_output.item() != 1.0:
            foreach_mul_(grads, grad_output)
        return None, None, *grads


class EWC(ExperienceCallback):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017) as a loss term ``ewc``.

    At the end of each experience the diagonal empirical Fisher ``F`` is estimated on that
    experience's training data as Avalanche's ``EWCPlugin`` does: the model in eval mode,
    the *mean-batch* cross-entropy gradient of each batch squared, averaged over the batches;
    the parameters ``θ*`` are kept as anchor. While training later experiences the loss
    gains ``λ/2 Σ_e Σ_i F_e,i (θ_i - θ*_e,i)²``.

    - ``separate``: one ``(F_e, θ*_e)`` per past experience, penalties summed.
    - ``online``: ``F ← γ F + F_new`` and the latest anchor only (Schwarz et al. 2018).

    Note the factor: Avalanche's penalty is ``ewc_lambda * Σ F (θ-θ*)²`` (no 1/2); this
    callback's ``ewc_lambda`` is twice Avalanche's for the same penalty.

    The per-step cost does not grow with the number of experiences: ``Σ_e F_e (θ-θ*_e)²``
    is folded into ``A (θ-m)² + c`` with ``A = Σ_e F_e``, ``m = Σ_e F_e θ*_e / A`` and the
    constant ``c = Σ_e F_e (θ*_e - m)²`` (kept, so the logged value is exact), evaluated as
    ``½ Σ u²`` with ``u = √(λA) ⊙ (θ - m)``: one ``torch._foreach_*`` pass over the
    parameters. With ``decoupled`` (the default) its gradient ``√(λA) ⊙ u = λA (θ - m)`` is
    added to ``.grad`` in one more pass in ``on_before_optimizer_step`` (after DDP's
    all-reduce and AMP's unscaling, before gradient clipping): the same update as
    back-propagating it, without the autograd round trip (measured ~10% of a step of the
    784-400-400 MLP on CPU). The loss term then holds the exact value, without gradient.

    Under DDP each rank estimates on its shard of the experience (indices
    ``rank::world_size``); the sums of squared gradients and the batch counts are
    all-reduced, so every rank holds the same Fisher (the mean over all batches of all ranks).

    Override :meth:`loss` for modules that are not classifiers.

    Args:
        ewc_lambda: weight ``λ`` of the penalty ``λ/2 Σ F (θ-θ*)²``.
        mode: ``separate`` or ``online``.
        decay_factor: ``γ`` of ``online`` mode (required there, rejected in ``separate``,
            as in Avalanche).
        fisher_samples: samples of each experience used for the Fisher (a fixed random
            subset, seeded by ``(seed, experience)``); default all of them.
        fisher_batch_size: batch size of the Fisher pass; default the datamodule's.
        seed: seed of the Fisher subset; default the run's (``seed_everything``).
        decoupled: apply the penalty's gradient right before the optimizer step (fast, for
            Lightning's optimizer loop); ``False`` back-propagates it through the loss term,
            for a loss used outside that loop.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.EWC
              init_args: {ewc_lambda: 1000.0, mode: online, decay_factor: 0.9}
    """

    def __init__(
        self,
        ewc_lambda: float = 1.0,
        mode: Literal["separate", "online"] = "separate",
        decay_factor: float | None = None,
        fisher_samples: int | None = None,
        fisher_batch_size: int | None = None,
        seed: int | None = None,
        decoupled: bool = True,
    ) -> None:
        if ewc_lambda < 0:
            raise ConfigError(f"EWC.ewc_lambda: must be non-negative, got {ewc_lambda}")
        if mode not in MODES:
            raise ConfigError(f"EWC.mode: one of {MODES}, got '{mode}'")
        if mode == "online" and decay_factor is None:
            raise ConfigError("EWC.decay_factor: required with mode 'online' (e.g. 0.9)")
        if mode == "separate" and decay_factor is not None:
            raise ConfigError("EWC.decay_factor: only used with mode 'online'")
        if decay_factor is not None and decay_factor < 0:
            raise ConfigError(f"EWC.decay_factor: must be non-negative, got {decay_factor}")
        for name, value in (
            ("fisher_samples", fisher_samples),
            ("fisher_batch_size", fisher_batch_size),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"EWC.{name}: must be at least 1, got {value}")
        self._term: str | None = None  # the name the module gave our extension point
        self.ewc_lambda = ewc_lambda
        self.mode = mode
        self.decay_factor = decay_factor
        self.fisher_samples = fisher_samples
        self.fisher_batch_size = fisher_batch_size
        self.seed = seed
        self.decoupled = decoupled
        # Flat Fisher and anchor over the parameters `names` (in that order): one pair per
        # consolidated experience in separate mode, the running pair in online mode.
        self.names: list[str] = []
        self.experiences: list[int] = []
        self.fishers: list[Tensor] = []
        self.anchors: list[Tensor] = []
        self._params: list[nn.Parameter] = []
        self._roots: list[Tensor] | None = None
        self._offsets: list[Tensor] | None = None
        self._const = 0.0
        # λ/2 c as a 0-d tensor for the penalty: a float attribute read there would be a
        # constant of a compiled penalty (model.compile), recompiled at every experience.
        self._const_term: Tensor | None = None
        self._folded_lambda = ewc_lambda
        self._u: list[Tensor] | None = None  # decoupled: √(λA) ⊙ (θ - m) of the last forward
        self._calls = 0  # decoupled: penalty evaluations since the last optimizer step

    # -- the penalty ----------------------------------------------------------------------
    def penalty(self, batch: Batch, outputs: dict[str, Tensor]) -> Tensor:
        """The loss term: ``λ/2 Σ_e Σ_i F_e,i (θ_i - θ*_e,i)²`` (zero before any Fisher)."""
        if self._roots is None:
            return outputs["logits"].new_zeros(())
        if self._folded_lambda != self.ewc_lambda:  # λ is part of the folded coefficients
            self.consolidate()
        if self.decoupled:
            self._calls += 1
            with torch.no_grad():
                self._u = foreach_addcmul(self._offsets, self._roots, self._params)
                value = torch.stack(foreach_norm(self._u)).square().sum() / 2
        else:
            value = _Quadratic.apply(self._roots, self._offsets, *self._params)
        return value + self._const_term

    @torch.no_grad()
    def apply_gradient(self, accumulate_grad_batches: int = 1) -> None:
        """Decoupled mode: add ``λA (θ - m)`` (from the last forward) to the gradients, once
        per penalty evaluation since the last step, divided by ``accumulate_grad_batches``
        as Lightning divides each accumulated loss (θ is the same across them)."""
        u, calls, self._u, self._calls = self._u, self._calls, None, 0
        if u is None or all(p.grad is None for p in self._params):  # no backward: no step
            return
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._params]
        foreach_addcmul_(grads, self._roots, u, value=calls / accumulate_grad_batches)

    def consolidate(self) -> None:
        """Fold the stored ``(F_e, θ*_e)`` into one quadratic ``A (θ - m)² + c`` and its
        per-parameter coefficients ``r = √(λA)``, ``o = -r m``."""
        self._roots = self._offsets = self._const_term = None
        self._const = 0.0
        if not self.fishers:
            return
        fishers, anchors = torch.stack(self.fishers), torch.stack(self.anchors)
        coef = fishers.sum(0)
        center = torch.where(
            coef > 0, (fishers * anchors).sum(0) / coef.clamp_min(1e-38), anchors[-1]
        )
        # The constant in float64: a sum of many small non-negative terms.
        self._const = float((fishers.double() * (anchors.double() - center.double()) ** 2).sum())
        roots = (self.ewc_lambda * coef).sqrt()
        offsets = -roots * center
        sizes = [p.numel() for p in self._params]
        self._roots = [
            r.view_as(p).to(p.dtype) for r, p in zip(roots.split(sizes), self._params, strict=True)
        ]
        self._offsets = [
            o.view_as(p).to(p.dtype)
            for o, p in zip(offsets.split(sizes), self._params, strict=True)
        ]
        self._const_term = torch.tensor(
            self.ewc_lambda / 2 * self._const, dtype=self._params[0].dtype, device=roots.device
        )
        self._folded_lambda = self.ewc_lambda

    # -- the Fisher -----------------------------------------------------------------------
    def loss(self, pl_module: LightningModule, batch: Batch) -> Tensor:
        """The loss whose squared gradients give the Fisher: cross-entropy of the module's
        logits (override for other objectives)."""
        if hasattr(pl_module, "batch_loss"):  # a module with its own objective (ContinualLM:
            return pl_module.batch_loss(batch)  # the mean next-token NLL)
        if hasattr(pl_module, "batch_logits"):  # a module of several inputs (a fusion)
            logits = pl_module.batch_logits(batch)
        else:
            logits = pl_module(batch[pl_module.input_key], batch.get("task"))
        return F.cross_entropy(logits, batch["label"])

    @torch.enable_grad()
    def estimate_fisher(
        self,
        pl_module: LightningModule,
        data: ExperienceData | Batch,
        experience: int,
        trainer: Trainer | None,
    ) -> Tensor:
        """Diagonal empirical Fisher (flat) of one experience: mean over batches of the
        squared mean-batch gradient, summed over ranks and batches when distributed. Only
        the ``fisher_samples`` drawn are read."""
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        data = as_experience(data)
        n = len(data)
        index = torch.arange(n)
        if self.fisher_samples is not None and self.fisher_samples < n:
            generator = torch.Generator().manual_seed(derive_seed(run_seed(self.seed), experience))
            index = torch.randperm(n, generator=generator)[: self.fisher_samples].sort().values
        index = index[rank::world_size]
        batch_size = self.fisher_batch_size or getattr(
            getattr(trainer, "datamodule", None), "batch_size", 64
        )
        params = self._params
        total = torch.zeros(sum(p.numel() for p in params) + 1, device=params[0].device)
        was_training = pl_module.training
        pl_module.eval()
        for batch in data.batches(batch_size, index):
            batch = {key: value.to(pl_module.device) for key, value in batch.items()}
            # autograd.grad leaves `.grad` (and DDP's gradient hooks) untouched. A parameter
            # frozen since the penalty was bound (an old expert, mneme.app.nn.heads.moe) gets zeros.
            live = [p for p in params if p.requires_grad]
            loss = self.loss(pl_module, batch)
            found = torch.autograd.grad(loss, live, allow_unused=True) if live else ()
            by_param = dict(zip(map(id, live), found, strict=True))
            grads = [by_param.get(id(p)) for p in params]
            flat = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
            total[:-1].addcmul_(flat, flat)
            total[-1] += 1
        pl_module.train(was_training)
        if world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        return total[:-1] / total[-1].clamp_min(1)

    def _bind(self, pl_module: LightningModule) -> None:
        """Resolve the parameters the penalty covers (trainable ones, by name)."""
        named = dict(pl_module.named_parameters())
        if not self.names:
            self.names = [name for name, p in named.items() if p.requires_grad]
        missing = [name for name in self.names if name not in named]
        if missing:
            raise ConfigError(f"EWC: the model lacks parameters {missing[:5]} of the stored Fisher")
        self._params = [named[name] for name in self.names]

    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params]).clone()

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, ZeroShotClassifier, "EWC")
        self._term = pl_module.add_loss_term("ewc", self.penalty)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._term is not None:
            pl_module.remove_loss_term(self._term)
            self._term = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The module is built and on its device now (also after a restore from a checkpoint).
        self._bind(pl_module)
        device = self._params[0].device
        self.fishers = [f.to(device) for f in self.fishers]
        self.anchors = [a.to(device) for a in self.anchors]
        self.consolidate()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer):
        if self._u is not None:
            self.apply_gradient(trainer.accumulate_grad_batches if trainer else 1)

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        if experience in self.experiences:  # already consolidated (state from a checkpoint)
            return
        self.update(
            pl_module, trainer.datamodule.train_experiences[experience], experience, trainer
        )

    def update(
        self,
        pl_module: LightningModule,
        data: ExperienceData | Batch,
        experience: int,
        trainer: Trainer | None = None,
    ) -> None:
        """Estimate the Fisher of one experience, store it with the anchor, consolidate."""
        if not self._params:
            self._bind(pl_module)
        fisher = self.estimate_fisher(pl_module, data, experience, trainer)
        anchor = self._flat_params()
        if self.mode == "online" and self.fishers:
            fisher = self.decay_factor * self.fishers[0] + fisher
            self.fishers, self.anchors = [], []
        self.fishers.append(fisher)
        self.anchors.append(anchor)
        self.experiences.append(experience)
        self.consolidate()

    # -- state ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "names": list(self.names),
            "experiences": list(self.experiences),
            "fishers": [f.cpu() for f in self.fishers],
            "anchors": [a.cpu() for a in self.anchors],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["mode"] != self.mode:
            raise ConfigError(
                f"EWC: the checkpoint is mode '{state_dict['mode']}', not '{self.mode}'"
            )
        self.names = list(state_dict["names"])
        self.experiences = list(state_dict["experiences"])
        self.fishers = list(state_dict["fishers"])
        self.anchors = list(state_dict["anchors"])
        self._params = []
        self._roots = self._offsets = None  # consolidated again at train start, on the device
