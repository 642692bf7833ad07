"""Progressive unfreezing: the backbone trains from the top down, one block group at a time."""

from __future__ import annotations

from typing import Any, Literal, Protocol

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from mneme.app.core.errors import ConfigError
from mneme.app.core.private_api import finetuning_is_restarting
from mneme.app.core.protocols import require
from mneme.app.core.schedule import experience_of_epoch
from mneme.callbacks.base import ChangesTraining
from torch import nn
from torch.optim import Optimizer

EVERY = ("epoch", "experience")
# 1: BaseFinetuning's optimizer metadata plus the block-group count and how many are unfrozen.
STATE_VERSION = 1
Group = list[tuple[str, nn.Parameter]]  # one block group: (name in the encoder, parameter)


class FineTunable(Protocol):
    """A module with a timm backbone ``encoder`` and a ``head`` outside it
    (:class:`mneme.app.ContinualClassifier`)."""

    encoder: Any
    head: Any


class ProgressiveUnfreezing(ChangesTraining, BaseFinetuning):
    """Train the head on a frozen backbone, then unfreeze the backbone from the top, one
    block group (or ``groups_per_step``) at a time, every ``every_n`` epochs or experiences.

    The block groups are timm's: the encoder's ``group_matcher(coarse=...)`` through
    :func:`timm.models.group_parameters` (stem, stages or blocks, ...); the group nearest the
    head is unfrozen first. At epoch ``e`` the top ``(u // every_n) * groups_per_step``
    groups train (at most ``max_groups``), with ``u = e`` or ``u`` the experience of ``e``:
    a pure function of the epoch, so a resumed run has unfrozen exactly the groups of an
    uninterrupted one (BaseFinetuning stores the optimizer's param groups in the checkpoint
    and restores them at fit start, before the optimizer state is loaded).

    Each unfrozen group joins the optimizer as its own param group (two with weight decay:
    1-D parameters and the encoder's ``no_weight_decay()`` names get none, as in
    :func:`mneme.app.finetuning.param_groups.layer_decay_param_groups`). Its learning rate is
    ``lr_scale * layer_decay**k`` times the head's current one, ``k = 0`` for the top group.

    Freezing sets ``requires_grad=False`` and nothing else: BaseFinetuning's ``freeze``
    would switch BatchNorm's ``track_running_stats`` off, so that even in eval it normalises
    with batch statistics. The module's rule decides the statistics
    (:func:`~mneme.app.finetuning.adaptation.freeze_norm_statistics`, applied at each epoch
    start after
    the callbacks): a frozen BatchNorm keeps them, one this callback unfreezes updates them.

    The module must build its optimizer over the trainable parameters only (the callback
    adds the rest as it unfreezes them); one built over frozen backbone parameters is
    refused at fit start. A module that builds its encoder in its own ``setup`` (which
    Lightning runs after the callbacks') is frozen at fit start instead, and its optimizer
    is built again then. Runs on one process only: DDP fixes the parameters it synchronises
    when it wraps the model (Lightning-AI/pytorch-lightning#20340).

    Args:
        every: unfreeze on an ``epoch`` or an ``experience`` schedule.
        every_n: epochs (experiences) between two unfreezing steps; the first is at epoch
            (experience) ``every_n``, before which only the head trains.
        groups_per_step: block groups unfrozen at each step.
        max_groups: the most groups ever unfrozen (``None``: the whole backbone).
        lr_scale: learning rate of an unfrozen group relative to the head's.
        layer_decay: factor from one unfrozen group to the next one down.
        coarse: timm's coarse groups (stages) rather than fine ones (blocks).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.ProgressiveUnfreezing
              init_args: {every: experience, every_n: 1, groups_per_step: 1, lr_scale: 0.1}
    """

    def __init__(
        self,
        every: Literal["epoch", "experience"] = "epoch",
        every_n: int = 1,
        groups_per_step: int = 1,
        max_groups: int | None = None,
        lr_scale: float = 1.0,
        layer_decay: float = 1.0,
        coarse: bool = True,
    ) -> None:
        super().__init__()
        who = "ProgressiveUnfreezing"
        if every not in EVERY:
            raise ConfigError(f"{who}.every: one of {EVERY}, got '{every}'")
        for name, value, least in (
            ("every_n", every_n, 1),
            ("groups_per_step", groups_per_step, 1),
            ("max_groups", 0 if max_groups is None else max_groups, 0),
        ):
            if value < least:
                raise ConfigError(f"{who}.{name}: must be at least {least}, got {value}")
        if lr_scale <= 0:
            raise ConfigError(f"{who}.lr_scale: must be positive, got {lr_scale}")
        if not 0 < layer_decay <= 1:
            raise ConfigError(f"{who}.layer_decay: must lie in (0, 1], got {layer_decay}")
        self.every = every
        self.every_n = every_n
        self.groups_per_step = groups_per_step
        self.max_groups = max_groups
        self.lr_scale = lr_scale
        self.layer_decay = layer_decay
        self.coarse = coarse
        self.groups: list[Group] = []  # top (nearest the head) first
        self.unfrozen = 0
        self._no_decay: set[str] = set()
        self._pending = False  # the encoder was not built at setup: freeze at fit start
        self._saved_groups: int | None = None

    # -- the schedule ---------------------------------------------------------------------
    def groups_at(self, epoch: int, trainer: Trainer) -> int:
        """How many block groups train at ``epoch`` (from the top)."""
        unit = epoch if self.every == "epoch" else experience_of_epoch(epoch, trainer.datamodule)
        n = unit // self.every_n * self.groups_per_step
        limit = len(self.groups) if self.max_groups is None else self.max_groups
        return min(n, limit, len(self.groups))

    # -- freezing -------------------------------------------------------------------------
    def freeze_before_training(self, pl_module: LightningModule) -> None:
        if getattr(pl_module, "encoder", None) is None:
            self._pending = True  # built in the module's setup, after this one
            return
        self._freeze(pl_module)

    def _freeze(self, pl_module: LightningModule) -> None:
        require(pl_module, FineTunable, "ProgressiveUnfreezing")
        self.groups = block_groups(pl_module.encoder, self.coarse)
        if not self.groups:
            raise ConfigError(
                "trainer.callbacks: ProgressiveUnfreezing finds no trainable encoder parameter "
                "to unfreeze (model.freeze_encoder or peft froze them); drop the callback"
            )
        nwd = getattr(pl_module.encoder, "no_weight_decay", None)
        self._no_decay = set(nwd()) if callable(nwd) else set()
        for group in self.groups:
            for _, param in group:
                param.requires_grad_(False)
        self._pending = False

    def _make_trainable(self, n: int) -> None:
        for group in self.groups[:n]:
            for _, param in group:
                param.requires_grad_(True)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer):
        n = self.groups_at(epoch, pl_module.trainer)
        self.unfrozen = n
        self._make_trainable(n)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        head = {id(p) for p in pl_module.head.parameters()}
        base = next(
            (g["lr"] for g in optimizer.param_groups if any(id(p) in head for p in g["params"])),
            optimizer.param_groups[0]["lr"],
        )
        decays = bool(optimizer.defaults.get("weight_decay"))
        for k, group in enumerate(self.groups[:n]):
            new = [(name, p) for name, p in group if id(p) not in held]
            if not new:  # unfrozen at an earlier epoch (or restored from the checkpoint)
                continue
            lr = base * self.lr_scale * self.layer_decay**k
            no_decay = [p for name, p in new if decays and self._exempt(name, p)]
            decay = [p for name, p in new if not (decays and self._exempt(name, p))]
            if decay:
                optimizer.add_param_group({"params": decay, "lr": lr})
            if no_decay:
                optimizer.add_param_group({"params": no_decay, "lr": lr, "weight_decay": 0.0})

    def _exempt(self, name: str, param: nn.Parameter) -> bool:
        return param.ndim <= 1 or name in self._no_decay

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise ConfigError(
                "trainer.callbacks: ProgressiveUnfreezing runs on one process; DDP fixes the "
                "parameters it synchronises when it wraps the model, so parameters unfrozen "
                "later would train apart on each rank; use trainer.devices: 1"
            )
        if self.every == "experience" and not hasattr(trainer.datamodule, "epochs_per_experience"):
            raise ConfigError(
                "ProgressiveUnfreezing.every: 'experience' needs a Mneme stream datamodule "
                "(epochs_per_experience); use every: epoch"
            )
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending:
            self._freeze(pl_module)
            trainer.strategy.setup_optimizers(trainer)  # built over the backbone: again
        if self._saved_groups is not None and self._saved_groups != len(self.groups):
            raise ConfigError(
                f"ckpt_path: the checkpoint's backbone had {self._saved_groups} block groups "
                f"to unfreeze, this one {len(self.groups)}; resume with the checkpoint's "
                "model.encoder"
            )
        if not finetuning_is_restarting(self):
            frozen = {id(p) for group in self.groups for _, p in group}
            for optimizer in trainer.optimizers:
                if any(id(p) in frozen for g in optimizer.param_groups for p in g["params"]):
                    raise ConfigError(
                        f"trainer.callbacks: ProgressiveUnfreezing adds each block group to the "
                        f"optimizer as it unfreezes it, but {type(pl_module).__name__}'s "
                        "configure_optimizers passed the frozen backbone; it must pass only "
                        "parameters with requires_grad"
                    )
        super().on_fit_start(trainer, pl_module)  # a resumed run: the param groups back
        self._make_trainable(self.unfrozen)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **super().state_dict(),
            "groups": len(self.groups),
            "unfrozen": self.unfrozen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._saved_groups = state_dict["groups"]
        self.unfrozen = state_dict["unfrozen"]


def block_groups(encoder: nn.Module, coarse: bool = True) -> list[Group]:
    """The trainable parameters of a timm ``encoder`` in its ``group_matcher`` groups, the
    top group (nearest the head) first; groups with nothing trainable are left out."""
    from timm.models import group_parameters

    matcher = getattr(encoder, "group_matcher", None)
    if not callable(matcher):
        raise ConfigError(
            f"model.encoder: ProgressiveUnfreezing needs a timm model with group_matcher() "
            f"(its block groups); {type(encoder).__name__} has none; use a timm model "
            "(resnet18, efficientnet_b0, vit_tiny_patch16_224, ...) or drop the callback"
        )
    params = dict(encoder.named_parameters())
    layers = group_parameters(encoder, matcher(coarse=coarse))
    groups = [
        [(name, params[name]) for name in layers[k] if params[name].requires_grad]
        for k in sorted(layers, reverse=True)
    ]
    return [group for group in groups if group]
