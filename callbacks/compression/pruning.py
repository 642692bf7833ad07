"""Magnitude pruning on a schedule, with the masks kept across experiences."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import Prunable, require
from mneme.callbacks.base import ExperienceCallback
from mneme.callbacks.compression.pruning_masks import (
    LAYER_TYPES,
    attention_out_projections,
    cubic_sparsity,
    head_sparsity_report,
    is_excluded,
    layer_sparsity_report,
    mask_heads,
    prunable_attention,
    prunable_layers,
    prune_heads_to,
    prune_layers_to,
    remove_pruning,
    zero_pruned,
)
from torch import Tensor, nn
from torch.nn.utils import prune

SCHEDULES = ("one_shot", "cubic")
METHODS = ("unstructured", "structured", "heads")
SCOPES = ("global", "layer")
STATE_VERSION = 2  # 2: head masks


class Pruning(ExperienceCallback):
    """Magnitude pruning of the module's Linear/Conv weights with ``torch.nn.utils.prune``.

    Pruning steps run at the ends of experiences ``start_experience`` .. ``end_experience``
    (after their training and validation, before their checkpoint): ``one_shot`` prunes to
    ``amount`` at ``start_experience``; ``cubic`` raises the sparsity along Zhu & Gupta's
    cubic schedule, ``amount * (1 - (1 - t/n)^3)`` after step ``t`` of the ``n`` experiences.
    Each step prunes only among the surviving weights (torch's ``PruningContainer``), so the
    masks only grow. Between steps and after them, later experiences train only the
    surviving weights (the mask is applied in the forward pass, and the pruned weights are
    zeroed in ``weight_orig`` too, so they stay exactly zero); with ``regrow`` the masks are
    lifted at the start of each experience (the pruned weights train again from zero) and
    the next step prunes afresh.

    - ``unstructured``: individual weights by ``|w|``; ``scope: global`` ranks all pruned
      layers' weights together (``prune.global_unstructured``: the asked sparsity over all of
      them, layers differ), ``scope: layer`` prunes each layer to the sparsity.
    - ``structured``: whole slices along ``dim`` (0: output neurons/channels; for a
      Transformer's attention projections, output rows = heads' dimensions) by their L``n``
      norm (``prune.ln_structured``), each layer to the sparsity.
    - ``heads``: whole attention heads of every ``nn.MultiheadAttention`` (open_clip's and
      torch's Transformers), each to the sparsity (a fraction of its heads): a head's query,
      key and value rows of the packed ``in_proj_weight`` (and ``in_proj_bias``) are masked
      together (``prune.custom_from_mask``), ranked by their joint L``n`` norm, so the head
      attends uniformly over zero values and adds nothing to ``out_proj``. Logged as
      ``prune/<attention>`` (fraction of heads) and ``prune/heads``.

    A ``MultiheadAttention``'s ``out_proj`` is never pruned as a Linear: torch reads its
    weight directly instead of calling it, so torch-prune's mask would not be applied (and
    the layer would stop training); it is named once at fit start.

    Checkpoints hold plain state_dicts (``weight``, not torch's ``weight_orig`` and
    ``weight_mask``: rewritten in ``on_save_checkpoint``) and the masks in this callback's
    state; a resumed run re-applies them (``prune.custom_from_mask``) in ``on_train_start``,
    after the module's weights are restored, so masks and sparsity are identical. At the end
    of ``fit`` ``prune.remove`` makes the pruning permanent: the module is plain again.

    Sparsity per layer and overall is logged as ``prune/<layer>`` and ``prune/sparsity``
    (step = experience). Under DDP the masks follow from the weights, which are the same on
    every rank, so every rank computes the same masks without communication.

    Args:
        amount: target sparsity in ``[0, 1)``.
        schedule: ``one_shot`` or ``cubic``.
        method: ``unstructured``, ``structured`` or ``heads``.
        scope: ``global`` or ``layer`` (``structured`` is per layer).
        start_experience: first pruning step's experience.
        end_experience: last step's experience (``cubic``); default the stream's last but one,
            so the last experience fine-tunes the pruned model.
        layer_types: layer classes pruned (names from ``Linear``, ``Conv1d/2d/3d``).
        exclude: names (prefixes) of submodules not pruned; default ``[head]``.
        dim, norm: ``structured``: the dimension of the slices and the norm ranking them.
        regrow: lift the masks at each experience start.
        remove_at_end: ``prune.remove`` at the end of ``fit``.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.Pruning
              init_args: {amount: 0.8, schedule: cubic, scope: global}
            # half the attention heads of a Transformer (an aligner's text tower), one shot
            # - class_path: mneme.callbacks.Pruning
            #   init_args: {amount: 0.5, method: heads}
    """

    def __init__(
        self,
        amount: float = 0.5,
        schedule: Literal["one_shot", "cubic"] = "one_shot",
        method: Literal["unstructured", "structured", "heads"] = "unstructured",
        scope: Literal["global", "layer"] = "global",
        start_experience: int = 0,
        end_experience: int | None = None,
        layer_types: list[str] | None = None,
        exclude: list[str] | None = None,
        dim: int = 0,
        norm: int = 2,
        regrow: bool = False,
        remove_at_end: bool = True,
    ) -> None:
        if not 0 <= amount < 1:
            raise ConfigError(f"Pruning.amount: a sparsity in [0, 1), got {amount}")
        for field, value, allowed in (
            ("schedule", schedule, SCHEDULES),
            ("method", method, METHODS),
            ("scope", scope, SCOPES),
        ):
            if value not in allowed:
                raise ConfigError(f"Pruning.{field}: one of {allowed}, got '{value}'")
        if start_experience < 0:
            raise ConfigError(f"Pruning.start_experience: must be >= 0, got {start_experience}")
        if end_experience is not None and end_experience < start_experience:
            raise ConfigError(
                f"Pruning.end_experience: must be >= start_experience ({start_experience}), "
                f"got {end_experience}"
            )
        layer_types = list(layer_types or ["Linear", "Conv1d", "Conv2d", "Conv3d"])
        unknown = [t for t in layer_types if t not in LAYER_TYPES]
        if unknown:
            raise ConfigError(f"Pruning.layer_types: {unknown} unknown; from {list(LAYER_TYPES)}")
        self.amount = amount
        self.schedule = schedule
        self.method = method
        self.scope = scope
        self.start_experience = start_experience
        self.end_experience = end_experience
        self.layer_types = layer_types
        self.exclude = ["head"] if exclude is None else list(exclude)
        self.dim = dim
        self.norm = norm
        self.regrow = regrow
        self.remove_at_end = remove_at_end
        self.masks: dict[str, Tensor] = {}  # layer name -> bool mask of its weight
        self.head_masks: dict[str, Tensor] = {}  # attention name -> bool mask of its heads
        self.steps_done: list[int] = []  # experiences whose step ran
        self.sparsity = 0.0  # the sparsity the last step asked

    # -- what is pruned -------------------------------------------------------------------
    def layers(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        """The layers pruned, by name."""
        return prunable_layers(pl_module, self.layer_types, self.exclude)

    def _excluded(self, name: str) -> bool:
        return is_excluded(name, self.exclude)

    def attention_layers(self, pl_module: nn.Module) -> dict[str, nn.MultiheadAttention]:
        """The attention modules whose heads ``heads`` prunes, by name."""
        return prunable_attention(pl_module, self.exclude)

    def _check(self, layers: dict[str, nn.Module], attention: dict | None = None) -> None:
        if self.method == "heads":
            if not attention:
                raise ConfigError(
                    "Pruning.method: 'heads' prunes nn.MultiheadAttention heads; the module "
                    f"has none outside {self.exclude}; use unstructured or structured"
                )
            for name, m in attention.items():
                if m.in_proj_weight is None:
                    raise ConfigError(
                        f"Pruning.method: 'heads' needs packed q/k/v projections; {name} has "
                        "separate ones (kdim/vdim differ from embed_dim); exclude it"
                    )
            return
        if not layers:
            raise ConfigError(
                f"Pruning.layer_types: the module has no {self.layer_types} layer outside "
                f"{self.exclude}; change layer_types or exclude"
            )
        if self.method == "structured":
            for name, m in layers.items():
                if not -m.weight.dim() <= self.dim < m.weight.dim():
                    raise ConfigError(
                        f"Pruning.dim: {name} ({type(m).__name__}) has a {m.weight.dim()}-D "
                        f"weight, no dim {self.dim}; use a dim below {m.weight.dim()}"
                    )

    def target(self, experience: int, num_experiences: int) -> float | None:
        """The sparsity the step at the end of ``experience`` asks; ``None``: no step."""
        start = self.start_experience
        end = start if self.schedule == "one_shot" else self.end_experience
        if end is None:
            end = max(start, num_experiences - 2)
        if not start <= experience <= end:
            return None
        if self.schedule == "one_shot":
            return self.amount
        steps = end - start + 1
        return cubic_sparsity(self.amount, experience - start + 1, steps)

    # -- masks ----------------------------------------------------------------------------
    def prune_to(self, pl_module: nn.Module, sparsity: float) -> None:
        """Prune the layers to ``sparsity`` (never un-pruning a weight)."""
        if self.method == "heads":
            prune_heads_to(self.attention_layers(pl_module), self.head_masks, sparsity, self.norm)
            return
        layers = self.layers(pl_module)
        self.masks = prune_layers_to(layers, sparsity, self.method, self.scope, self.dim, self.norm)

    def apply_masks(self, pl_module: nn.Module) -> None:
        """Re-apply the stored masks (after a restore) with ``prune.custom_from_mask``."""
        layers = self.layers(pl_module)
        missing = [n for n in self.masks if n not in layers]
        if missing:
            raise ConfigError(f"Pruning: the model lacks the pruned layers {missing[:5]}")
        for name, mask in self.masks.items():
            m = layers[name]
            if not prune.is_pruned(m):
                prune.custom_from_mask(m, "weight", mask.to(m.weight.device))
        zero_pruned(layers)
        attention = self.attention_layers(pl_module)
        missing = [n for n in self.head_masks if n not in attention]
        if missing:
            raise ConfigError(f"Pruning: the model lacks the pruned attention {missing[:5]}")
        for name, alive in self.head_masks.items():
            if not prune.is_pruned(attention[name]):
                mask_heads(attention[name], alive)

    def remove(self, pl_module: nn.Module) -> None:
        """``prune.remove`` on every pruned layer: plain ``weight`` Parameters, zeros kept."""
        remove_pruning(self.layers(pl_module), self.attention_layers(pl_module))

    def report(self, pl_module: nn.Module) -> dict[str, float]:
        """Sparsity per layer (``prune/<layer>``) and over all pruned layers (``heads``: the
        fraction of each attention's heads, and over all of them)."""
        if self.method == "heads":
            return head_sparsity_report(self.head_masks)
        return layer_sparsity_report(self.layers(pl_module))

    def report_lines(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        """The sparsity the run ends with, printed under the accuracy matrix
        (``ContinualMetrics``; the same figures as the ``prune/*`` scalars)."""
        if not self.steps_done:
            return []
        report = {n.removeprefix("prune/"): v for n, v in self.report(pl_module).items()}
        overall = report.pop("heads" if self.method == "heads" else "sparsity")
        what = "of the attention heads pruned" if self.method == "heads" else "sparsity"
        layers = ", ".join(f"{name} {value:.2f}" for name, value in report.items())
        return [f"Pruning ({self.method}): {what} {overall:.2f} (per layer: {layers})"]

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, Prunable, "Pruning")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The module has built its layers in its own `setup`, which runs after this one's.
        self._check(self.layers(pl_module), self.attention_layers(pl_module))
        skipped = [
            n
            for n in attention_out_projections(pl_module)
            if not self._excluded(n) and self.method != "heads"
        ]
        if skipped:
            rank_zero_info(
                f"Pruning: not pruned, MultiheadAttention out_proj (torch reads its weight "
                f"without calling it): {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.masks:  # restored from a checkpoint: the weights are loaded now
            self.apply_masks(pl_module)

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        if self.regrow and (self.masks or self.head_masks):
            self.remove(pl_module)
            self.masks, self.head_masks = {}, {}

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        if experience in self.steps_done:
            return
        sparsity = self.target(experience, trainer.datamodule.num_experiences)
        if sparsity is None:
            return
        self.prune_to(pl_module, sparsity)
        self.sparsity = sparsity
        self.steps_done.append(experience)
        for logger in trainer.loggers:
            logger.log_metrics(self.report(pl_module), step=experience)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # torch prune's `weight_orig` + `weight_mask` become the plain `weight` (equal to
        # weight_orig, see pruning_masks.zero_pruned); the masks travel in this callback's
        # state. This is what Lightning's ModelPruning writes (its
        # `_make_pruning_permanent_on_state_dict`, private, over every `_mask` key); neither
        # torch nor Lightning has a public call for a permanent *copy* of a pruned state
        # dict, and `prune.remove` (the public permanence, used at fit end and by
        # `mneme export`) would end the pruning in place.
        state = checkpoint.get("state_dict")
        if state is None:
            return
        params = [(name, "weight") for name in self.masks]
        params += [(n, p) for n in self.head_masks for p in ("in_proj_weight", "in_proj_bias")]
        for name, param in params:
            prefix = f"{name}.{param}"
            if prefix + "_orig" in state:
                orig = state.pop(prefix + "_orig")
                mask = state.pop(prefix + "_mask")
                state[prefix] = orig * mask

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.remove_at_end:
            self.remove(pl_module)

    # -- state ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, scope=self.scope)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "method": self.method,
            "masks": {n: m.cpu() for n, m in self.masks.items()},
            "head_masks": {n: m.cpu() for n, m in self.head_masks.items()},
            "steps_done": list(self.steps_done),
            "sparsity": self.sparsity,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["method"] != self.method:
            raise ConfigError(
                f"Pruning.method: the checkpoint is '{state_dict['method']}', not "
                f"'{self.method}'; resume with the same method"
            )
        self.masks = dict(state_dict["masks"])
        self.head_masks = dict(state_dict.get("head_masks", {}))  # version 1 had none
        self.steps_done = list(state_dict["steps_done"])
        self.sparsity = float(state_dict["sparsity"])
