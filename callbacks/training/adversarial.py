"""Adversarial training (Madry et al. 2018: train on PGD/FGSM examples made on the fly) and
the robust accuracy matrix (accuracy under attack per experience, after each experience).

The attack math is :mod:`mneme.app.nn.attacks` (pixel space ``[0, 1]``, ``eps`` in pixels, the
stream's standardization undone and reapplied). Attacks run with the module in eval mode
(batch norms use their running statistics and are not updated by the attack's passes).

Why Madry's and not TRADES: Madry's objective is a batch transform (inputs replaced by their
adversarial versions) and so composes unchanged with every other strategy (Replay's rows are
attacked too, MixUp's soft targets are the attack's targets, EWC/LwF loss terms see the
adversarial batch); TRADES needs a second forward on clean inputs and a KL term of its own
in the loss, i.e. a change of the module's objective, not of its batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.metrics import summarize
from mneme.app.core.protocols import SOFT_LABEL, Batch, ZeroShotClassifier, require
from mneme.app.core.seeding import derive_seed, run_seed
from mneme.app.nn.attacks import check_attack, classification_loss, pgd
from mneme.callbacks.base import ExperienceCallback
from mneme.callbacks.run_context import input_normalization, write_json
from mneme.callbacks.training.batch_augmentation import (
    APPLY_TO,
    check_current_rows,
    current_rows,
)
from torch import Tensor

STATE_VERSION = 1


class _Attack:
    """The attack settings shared by the training and evaluation callbacks."""

    def __init__(self, who, eps, steps, step_size, norm, random_start, normalization) -> None:
        check_attack(who, eps, steps, step_size, norm)
        self.eps, self.steps, self.step_size = eps, steps, step_size
        self.norm, self.random_start, self.normalization = norm, random_start, normalization

    def run(self, module, x, task, label, soft, normalization, generator) -> Tensor:
        """Adversarial inputs for ``module`` (in eval mode while attacking)."""
        was_training = module.training
        module.eval()
        try:
            return pgd(
                lambda inp: classification_loss(module(inp, task), label, soft),
                x,
                self.eps,
                steps=self.steps,
                step_size=self.step_size,
                norm=self.norm,
                random_start=self.random_start,
                normalization=self.normalization or normalization,
                generator=generator,
            )
        finally:
            module.train(was_training)

    def settings(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "norm": self.norm,
            "random_start": self.random_start,
        }


class AdversarialTraining(ExperienceCallback):
    """Madry-style adversarial training: each training batch's inputs are replaced by PGD
    (or FGSM: ``steps: 1, random_start: false``) examples against the current model, made on
    the fly, on the targets the batch carries (``soft_label`` from MixUp, else ``label``).
    Place it after Replay/MixUp in ``trainer.callbacks`` to attack their rows;
    ``apply_to: current`` attacks only the stream's rows (not replayed ones).

    Args:
        eps: perturbation budget in ``[0, 1]`` pixel space (L-inf or L2 radius).
        steps: PGD steps (1 with ``random_start: false`` and ``step_size = eps``: FGSM).
        step_size: default ``2.5 * eps / steps`` (``eps`` for one step).
        norm: ``linf`` or ``l2``.
        random_start: start from a uniform point of the L-inf ball (projected for L2).
        normalization: ``(mean, std)`` of the inputs; default the model's
            ``input_normalization`` or the stream's.
        apply_to: ``all`` or ``current``.
        input_key: the batch key of the inputs.
        seed: base seed of the random starts; default the run's.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.AdversarialTraining
              init_args: {eps: 0.1, steps: 5, norm: linf}
    """

    def __init__(
        self,
        eps: float = 0.1,
        steps: int = 5,
        step_size: float | None = None,
        norm: str = "linf",
        random_start: bool = True,
        normalization: list | None = None,
        apply_to: str = "all",
        input_key: str = "image",
        seed: int | None = None,
    ) -> None:
        self.attack = _Attack(
            "AdversarialTraining", eps, steps, step_size, norm, random_start, normalization
        )
        if apply_to not in APPLY_TO:
            raise ConfigError(
                f"AdversarialTraining.apply_to: one of {list(APPLY_TO)}, got '{apply_to}'"
            )
        self.apply_to, self.input_key, self.seed = apply_to, input_key, seed
        self._trainer: Trainer | None = None
        self._module: LightningModule | None = None
        self._transform: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module
        require(pl_module, ZeroShotClassifier, "AdversarialTraining")
        if self.apply_to == "current":
            check_current_rows(trainer, "AdversarialTraining")
        self._transform = pl_module.add_batch_transform("adversarial", self.perturb)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._transform is not None:
            pl_module.remove_batch_transform(self._transform)
            self._transform = None
        self._trainer = self._module = None

    def perturb(self, batch: Batch, batch_idx: int = 0) -> Batch:
        """The batch with (the first ``apply_to`` rows of) its inputs attacked."""
        x = batch[self.input_key]
        n = len(x) if self.apply_to == "all" else current_rows(batch)
        trainer, module = self._trainer, self._module
        keys = (trainer.global_rank, trainer.global_step) if trainer is not None else (0, 0)
        g = torch.Generator().manual_seed(derive_seed(run_seed(self.seed), *keys, batch_idx))
        soft = batch.get(SOFT_LABEL)
        adv = self.attack.run(
            module,
            x[:n],
            batch["task"][:n],
            batch["label"][:n],
            None if soft is None else soft[:n],
            input_normalization(trainer, module),
            g,
        )
        return {**batch, self.input_key: torch.cat([adv, x[n:]])}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.attack.settings())


class RobustAccuracy(ExperienceCallback):
    """The robust accuracy matrix ``R_adv[k, j]``: accuracy on test experience ``j`` under
    the attack, after training experience ``k``, next to ContinualMetrics' clean one, with
    the same summary (average, forgetting, BWT: :func:`mneme.app.core.metrics.summarize`),
    so robustness forgetting shows. Written to ``<log_dir>/<name>_metrics.json`` and logged
    as ``<name>/acc_exp<j>`` and ``<name>/<figure>`` (step = experience; ``name`` defaults
    to ``robust``, then ``robust_2``, ... for further unnamed ones). Several attacks (FGSM
    beside PGD-10, two radii) are several callbacks, each with its own ``name``.

    Evaluated at each experience end on the stream's validation loaders; under DDP each rank
    attacks every ``world_size``-th batch and the counts are summed across ranks.
    ``max_batches`` bounds the batches per test experience (the cost is ``steps`` forward
    and backward passes per batch). The attack's random start is seeded by
    ``(seed, experience, j, batch)``.

    Args: as :class:`AdversarialTraining` (``eps``, ``steps``, ``step_size``, ``norm``,
    ``random_start``, ``normalization``, ``input_key``, ``seed``), ``max_batches``, and
    ``name`` (the metrics' prefix and file name).

    Example (YAML; PGD-10 at eps 0.1)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.RobustAccuracy
              init_args: {eps: 0.1, steps: 10}
    """

    affects_training = False

    def __init__(
        self,
        eps: float = 0.1,
        steps: int = 10,
        step_size: float | None = None,
        norm: str = "linf",
        random_start: bool = True,
        normalization: list | None = None,
        max_batches: int | None = None,
        input_key: str = "image",
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        self.attack = _Attack(
            "RobustAccuracy", eps, steps, step_size, norm, random_start, normalization
        )
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"RobustAccuracy.max_batches: at least 1, got {max_batches}")
        if name is not None and not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(
                f"RobustAccuracy.name: letters, digits, '_' or '-' (a file name), got {name!r}"
            )
        self.max_batches, self.input_key, self.seed = max_batches, input_key, seed
        self.name = name
        self.prefix = name or "robust"  # resolved in setup when several are unnamed
        self.rows: list[list[float]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, ZeroShotClassifier, "RobustAccuracy")
        # Two evaluations under one name would overwrite each other's file and scalars: an
        # explicit name twice is refused; unnamed ones are robust, robust_2, ... in order.
        others = [c for c in trainer.callbacks if isinstance(c, RobustAccuracy)]
        names = [c.name for c in others]
        if self.name is not None and names.count(self.name) > 1:
            raise ConfigError(
                f"RobustAccuracy.name: {names.count(self.name)} RobustAccuracy callbacks are "
                f"named '{self.name}'; give each its own name (e.g. name: robust_fgsm)"
            )
        if self.name is None:
            unnamed = [c for c in others if c.name is None]
            k = next(i for i, c in enumerate(unnamed) if c is self)
            self.prefix = "robust" if k == 0 else f"robust_{k + 1}"
            if self.prefix in names:
                raise ConfigError(
                    f"RobustAccuracy.name: '{self.prefix}' is both given and derived for an "
                    "unnamed RobustAccuracy; name every RobustAccuracy callback"
                )

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, experience: int) -> list:
        """Robust accuracy on each test experience (NaN for an empty one)."""
        rank, world = trainer.global_rank, trainer.world_size
        device = pl_module.device
        norm = input_normalization(trainer, pl_module)
        loaders = trainer.datamodule.val_dataloader()
        counts = torch.zeros(len(loaders), 2, dtype=torch.float64, device=device)
        for j, loader in enumerate(loaders):
            for i, batch in enumerate(loader):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                if i % world != rank:
                    continue
                batch = {k: v.to(device) for k, v in batch.items()}
                seed = derive_seed(run_seed(self.seed), experience, j, i)
                g = torch.Generator().manual_seed(seed)
                x, task, label = batch[self.input_key], batch["task"], batch["label"]
                adv = self.attack.run(pl_module, x, task, label, None, norm, g)
                with torch.no_grad():
                    was = pl_module.training
                    pl_module.eval()
                    pred = pl_module(adv, task).argmax(dim=1)
                    pl_module.train(was)
                counts[j, 0] += (pred == label).sum()
                counts[j, 1] += len(label)
        if world > 1:
            torch.distributed.all_reduce(counts)
        return [c / t if t else math.nan for c, t in counts.tolist()]

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        row = self.evaluate(trainer, pl_module, experience)
        del self.rows[experience:]
        self.rows.append(row)
        summary = summarize(self.rows)
        name = self.prefix
        scalars = {f"{name}/acc_exp{j}": a for j, a in enumerate(row) if not math.isnan(a)}
        for key in ("average_accuracy", "forgetting", "bwt"):
            if summary.get(key) is not None:
                scalars[f"{name}/{key}"] = summary[key]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=experience)
        record = {"attack": self.attack.settings(), **summary}
        write_json(trainer, f"{name}_metrics.json", record)

    def summary(self) -> dict[str, Any]:
        return summarize(self.rows)

    def report_lines(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        """The robust matrix, printed under the clean one (``ContinualMetrics``; the
        content of ``<name>_metrics.json``)."""
        from mneme.callbacks.reporting.accuracy_tables import format_matrix

        a = self.attack
        attack = f"PGD-{a.steps}, {a.norm} eps {a.eps:g}" if a.steps > 1 else f"FGSM eps {a.eps:g}"
        title = f"Robust accuracy matrix '{self.prefix}' ({attack}; row: after experience k)"
        return format_matrix(title, self.rows, summary=self.summary() if self.rows else None)

    @property
    def state_key(self) -> str:
        if self.name is None:  # the key checkpoints written before `name` existed carry
            return self._generate_state_key(**self.attack.settings())
        return self._generate_state_key(name=self.name, **self.attack.settings())

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rows": [list(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [list(r) for r in state_dict["rows"]]
