"""ContinualClassifier: an encoder (timm, by name) and the head the scenario needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from mneme.app.core.errors import ConfigError
from mneme.app.core.metrics import ExperienceAccuracy
from mneme.app.core.private_api import exclude_from_ddp_sync
from mneme.app.core.schedule import (
    current_experience,
    is_experience_end,
)
from mneme.app.finetuning.adaptation import BackboneAdaptation, freeze_norm_statistics
from mneme.app.finetuning.param_groups import layer_decay_param_groups
from mneme.app.models.base import Batch, ContinualModule
from mneme.app.models.head_hooks import HeadHooks
from mneme.app.models.prediction_rows import DEFAULT_TOP_K, class_rows
from mneme.app.nn.backbones import backbone_from_hparams
from mneme.app.nn.encoders import feature_dim
from mneme.app.nn.heads.prototypes import LINEAR
from mneme.app.nn.heads.registry import create_head
from torch import Tensor, nn


class ContinualClassifier(HeadHooks, ContinualModule):
    """Image classifier for class-, task- and domain-incremental streams.

    Heads: one shared head when the stream has a single task label (class-/domain-
    incremental); one head per task, selected by each sample's task label, when it has
    several (task-incremental, multi-head). With ``mask_unseen_classes`` the logits of classes
    not seen yet (per head) are masked, which equals Avalanche's growing
    ``IncrementalClassifier`` without rebuilding layers or optimizer state.

    Prototype heads (``head: {name: ncm | simplecil | ranpac, ...}``, see
    :mod:`mneme.app.nn.heads.prototypes`) predict from class statistics of the backbone's features,
    with no replay buffer. After each experience's training one extra pass over its
    training samples (unaugmented, the model in eval mode, each process its own shard)
    accumulates them; it runs before the validation of the experience's last epoch, so
    the accuracy row of experience ``k`` already knows ``k``'s classes. With a frozen
    backbone nothing trains: the training step does nothing and no optimizer is built.
    With a trainable backbone (``peft``, ``freeze_encoder: false``: APER-style adaptation)
    the linear ``head`` still gives the cross-entropy that trains it, and the prototype
    head predicts once it has statistics (statistics of earlier experiences stay those of
    the backbone as it was then).

    Strategies act through the extension points of :class:`ContinualModule` (``loss_terms``,
    ``batch_transforms``); training ``outputs`` hold ``logits`` and ``features``.

    Args:
        encoder: a timm model name (``mneme_mlp``, ``mneme_cnn``, ``resnet18``, ...).
        encoder_args: keyword arguments of the timm model (``hidden: [400, 400]``).
        encoder_weights: a local weights file for the encoder (``package:<name>/<path>``: a
            file inside an installed package); see :mod:`mneme.app.nn.backbones`.
        encoder_weights_keys: ``exact`` (the file uses timm's names) or ``by_position``
            (another library's names, same tensors in the same order).
        encoder_pretrained: timm's published weights: ``true`` (the default tag) or a tag
            (``augreg_in21k``); downloads.
        encoder_input_size: ``[H, W]`` a pretrained encoder sees (default: its own); inputs
            are resized and normalized by the encoder's data config.
        freeze_encoder: train no weight of the encoder; ``None``: frozen when ``peft`` is set.
        peft: parameter-efficient fine-tuning of the encoder (``{method: lora, r: 4, ...}``);
            see :mod:`mneme.app.finetuning.adaptation`.
        layer_decay: per-layer learning-rate decay of the encoder (timm's
            ``param_groups_layer_decay``: each layer group below the top trains at
            ``lr * layer_decay**depth``; the head at the optimizer's lr).
        optimizer: optimizer class and arguments (``class_path: torch.optim.SGD``).
        reset_optimizer: clear the optimizer state (momentum, Adam moments) at each
            experience start; Lightning keeps one optimizer for the whole fit.
        mask_unseen_classes: restrict predictions to the classes seen so far.
        multi_head: one head per task; ``None`` decides from the stream's task labels.
        head: what predicts: ``{name: linear}`` (the default), or a prototype head with its
            arguments (``{name: ncm, metric: cosine}``, ``{name: simplecil}``,
            ``{name: ranpac, projection_dim: 5000, ridges: [...], holdout: 0.2}``).
        num_classes, num_tasks, input_shape: read from the datamodule when not given.
        input_normalization: the ``(mean, std)`` the stream standardized its images with
            (floats, or one per channel), read from the datamodule's declaration when not
            given; a pretrained encoder undoes it (Avalanche's SplitCIFAR100 normalizes with
            ``[[0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]]``).
        input_key: the batch key of the input.
        compile: ``torch.compile`` the encoder in place (``true``, or torch.compile's
            arguments ``{mode: max-autotune, fullgraph: false, dynamic: false, backend:
            inductor}``), and the strategies' loss terms unless ``loss_terms: false``; see
            :meth:`ContinualModule.configure_model`. On a GPU pair it with
            ``trainer.precision: bf16-mixed``.

    Example (YAML)::

        model:
          class_path: mneme.app.ContinualClassifier
          init_args:
            encoder: mneme_mlp
            encoder_args: {hidden: [400, 400]}
            optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}
    """

    def __init__(
        self,
        encoder: str = "mneme_mlp",
        encoder_args: dict[str, Any] | None = None,
        encoder_weights: str | None = None,
        encoder_weights_keys: str = "exact",
        encoder_pretrained: bool | str | None = None,
        encoder_input_size: Sequence[int] | None = None,
        freeze_encoder: bool | None = None,
        peft: dict[str, Any] | None = None,
        layer_decay: float | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        reset_optimizer: bool = False,
        mask_unseen_classes: bool = True,
        multi_head: bool | None = None,
        head: dict[str, Any] | None = None,
        num_classes: int | None = None,
        num_tasks: int | None = None,
        input_shape: Sequence[int] | None = None,
        input_normalization: Sequence[float | Sequence[float]] | None = None,
        input_key: str = "image",
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(optimizer, reset_optimizer, compile)
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.input_key = input_key
        self.encoder: nn.Module | None = None
        if num_classes is not None and input_shape is not None:
            self._build(num_classes, num_tasks or 1, tuple(input_shape))

    # -- building -------------------------------------------------------------------------
    def _build(self, num_classes: int, num_tasks: int, input_shape: tuple[int, ...]) -> None:
        hp = self.hparams
        self.hparams.update(num_classes=num_classes, num_tasks=num_tasks, input_shape=input_shape)
        self.num_heads = num_tasks if (hp.multi_head is None or hp.multi_head) else 1
        self.num_classes = num_classes
        self.encoder = backbone_from_hparams(
            hp, input_shape, input_normalization=hp.input_normalization
        )
        self.adaptation = BackboneAdaptation(
            self.encoder, hp.peft, hp.freeze_encoder, num_tasks, input_shape
        )
        freeze_norm_statistics(self.encoder)
        # All heads in one Linear: one matmul, then each sample picks its task's slice.
        width = feature_dim(self.encoder, input_shape)
        # The registry's head (mneme.app.nn.heads.registry): the linear layer, or routed
        # expert MLPs (moe); a prototype head's statistics over the same slots (task *
        # num_classes + label) next to the linear layer.
        slots = self.num_heads * num_classes
        self.head, self.prototype_head = create_head(hp.head, width, slots)
        if self.prototype_head is not None:
            # Equal on every process by construction (summed across them): DDP need not
            # broadcast them at each forward (a RanPAC Gram matrix is hundreds of MB).
            names = [f"prototype_head.{n}" for n, _ in self.prototype_head.named_buffers()]
            exclude_from_ddp_sync(self, names)
        self.register_buffer(
            "class_mask", torch.zeros(self.num_heads, num_classes, dtype=torch.bool)
        )

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if self.encoder is None:
            shape = datamodule.field_shape(self.input_key)
            if self.hparams.input_normalization is None:
                norm = getattr(datamodule, "input_normalization", None)
                self.hparams.update(input_normalization=list(norm) if norm else None)
            self._build(datamodule.num_classes, datamodule.num_tasks, shape)
        self._check_fits(datamodule)
        self.experience_accuracy = ExperienceAccuracy(len(datamodule.test_experiences))
        self.head_hooks.add_loss_terms(self)

    def _check_fits(self, datamodule) -> None:
        """A model built for another stream (a config or checkpoint made for other data)
        fails here with the mismatch named, not with a shape error deep in a matmul."""
        hp = self.hparams
        stream = {
            "input_shape": datamodule.field_shape(self.input_key),
            "num_classes": datamodule.num_classes,
            "num_tasks": datamodule.num_tasks,
        }
        model = {"input_shape": tuple(hp.input_shape), "num_classes": hp.num_classes}
        model["num_tasks"] = hp.num_tasks
        if model["input_shape"] != stream["input_shape"]:
            raise ConfigError(
                f"model.input_shape: the model takes inputs of shape {model['input_shape']} "
                f"but the stream's are {stream['input_shape']}; use a model (or checkpoint) "
                "made for this stream"
            )
        for key in ("num_classes", "num_tasks"):
            if model[key] < stream[key]:
                raise ConfigError(
                    f"model.{key}: the model has {model[key]} but the stream needs "
                    f"{stream[key]}; use a model (or checkpoint) made for this stream"
                )

    def compiled_modules(self) -> list[nn.Module]:
        return [self.encoder]

    # -- prototype statistics -------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # Lightning validates at an epoch end before ``on_train_epoch_end``: the statistics
        # of the experience just trained are taken here, so its accuracy row counts them.
        trainer = self.trainer
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            if is_experience_end(trainer):
                self.fit_prototypes(current_experience(trainer))

    def fit_prototypes(self, experience: int) -> bool:
        """Accumulate the prototype statistics of a finished experience from its training
        samples (every process its shard; summed across processes). Idempotent: an
        experience already absorbed (also one restored from a checkpoint) is skipped."""
        if self.prototype_head is None:
            return False
        trainer = self.trainer
        datamodule = trainer.datamodule
        was_training = self.training
        self.eval()
        try:
            return self.prototype_head.fit_experience(
                datamodule.train_experiences[experience],
                self._encode,
                experience,
                getattr(datamodule, "eval_batch_size", 512),
                trainer.global_rank,
                trainer.world_size,
            )
        finally:
            self.train(was_training)

    def _encode(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Features and label slots (``task * num_classes + label``) of a batch."""
        x = batch[self.input_key].to(self.device)
        task = batch["task"].to(self.device)
        slots = batch["label"].to(self.device)
        if self.num_heads > 1:
            slots = slots + task * self.num_classes
        return self.features(x, task), slots

    def trains_nothing(self) -> bool:
        """A prototype head on a frozen backbone: nothing to train (unless a fine-tuning
        callback will unfreeze the backbone, which needs the linear head's optimizer)."""
        if self.prototype_head is None or any(p.requires_grad for p in self.encoder.parameters()):
            return False
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        return not any(isinstance(c, BaseFinetuning) for c in callbacks)

    # -- checkpoints ----------------------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        if is_experience_end(self.trainer):  # before the end-of-epoch checkpoint is written
            self.fit_prototypes(current_experience(self.trainer))  # when no validation ran
            self.adaptation.end_experience()
            self.end_head_experience()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of a model made for another stream is refused naming the field,
        before its weights meet this model's shapes."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        theirs, ours = _head_spec(saved.get("head")), _head_spec(self.hparams.get("head"))
        if theirs != ours:
            raise ConfigError(
                f"model.head: the checkpoint's model has head {theirs}, this one {ours}; use "
                "the head the checkpoint was trained with"
            )
        for key in ("input_shape", "num_classes", "num_tasks"):
            theirs, ours = saved.get(key), self.hparams.get(key)
            if theirs is not None and ours is not None and tuple(_seq(theirs)) != tuple(_seq(ours)):
                raise ConfigError(
                    f"model.{key}: the checkpoint's model has {key} {theirs}, this stream's "
                    f"is {ours}; use the config (stream) the checkpoint was trained with"
                )
        self.restore_head(checkpoint)  # e.g. as many experts as it saved, before they load

    def optimizer_parameters(self):
        """The trainable parameters, in per-layer groups with ``layer_decay``."""
        if self.hparams.layer_decay is None:  # HeadHooks': the head's own groups, if any
            return super().optimizer_parameters()
        if not 0 < self.hparams.layer_decay <= 1:
            raise ConfigError(
                f"model.layer_decay: in (0, 1], got {self.hparams.layer_decay} "
                "(0.65-0.9 is usual for fine-tuning)"
            )
        own = self.head_hooks.param_groups()  # a group per expert generation (resumable)
        groups = layer_decay_param_groups(
            self.encoder, None if own else self.head, layer_decay=self.hparams.layer_decay
        )
        return groups + own

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        return self.logits(self.features(x, task), task)

    def features(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """The encoder's features, each sample through its task's adapter (``per_task``)."""
        return self.adaptation.run(self.encoder, x, task)

    def logits(self, features: Tensor, task: Tensor | None = None) -> Tensor:
        """Logits of each sample's head, unseen classes masked: the prototype head's once it
        has statistics (classes without any masked too), else the linear head's."""
        prototypes = self.prototype_head
        if prototypes is not None and prototypes.ready:
            return self._select(prototypes(features), task, prototypes.seen)
        return self._select(self.head(features), task)

    def linear_logits(self, features: Tensor, task: Tensor | None = None) -> Tensor:
        """The linear head's logits (what cross-entropy trains), unseen classes masked."""
        return self._select(self.head(features), task)

    def _select(self, logits: Tensor, task: Tensor | None, available: Tensor | None = None):
        """Each sample's task slice of all heads' ``logits``, masked to the classes seen
        (and to the ``available`` slots: those with prototype statistics)."""
        if self.num_heads > 1:
            heads = task if task is not None else logits.new_zeros(len(logits), dtype=torch.long)
            logits = logits.view(len(logits), self.num_heads, self.num_classes)
            logits = logits[torch.arange(len(logits), device=logits.device), heads]
            mask = self.class_mask[heads]
            if available is not None:
                available = available.view(self.num_heads, self.num_classes)[heads]
        else:
            mask = self.class_mask[0].expand_as(logits)
            if available is not None:
                available = available.expand_as(logits)
        masking = self.hparams.mask_unseen_classes
        if available is not None:
            mask, masking = (mask & available if masking else available), True
        if masking:
            mask = mask | ~mask.any(dim=1, keepdim=True)  # a head with nothing seen: no mask
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        return logits

    def observe_experience(self, classes: Sequence[int], tasks: Sequence[int]) -> None:
        """Mark the classes of an experience as seen, per head (idempotent)."""
        for head in list(tasks) if self.num_heads > 1 else [0]:
            self.class_mask[head, list(classes)] = True

    # -- training -------------------------------------------------------------------------
    def training_terms(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        features = self.features(batch[self.input_key], batch["task"])
        logits = self.linear_logits(features, batch["task"])
        return self.classification_terms(logits, features, batch)

    # -- evaluation -----------------------------------------------------------------------
    predict_top_k = DEFAULT_TOP_K  # set by PredictionWriter (--predictions.top_k)

    def predicted_classes(self, batch: Batch) -> Tensor:
        return self(batch[self.input_key], batch["task"]).argmax(dim=1)

    def predict_step(
        self, batch: Batch, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """One row per sample (``mneme predict``): ``predicted``, ``top_classes`` and
        ``top_probabilities``, ``label`` when known, ``task`` with one head per task."""
        logits = self(batch[self.input_key], batch["task"])
        return class_rows(logits, self.predict_top_k, batch, with_task=self.num_heads > 1)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.experience_accuracy.update(
            self.predicted_classes(batch), batch["label"], dataloader_idx
        )

    test_step = validation_step


def _head_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """A ``model.head`` spec with its name (``None`` is the linear head)."""
    return {"name": LINEAR, **dict(spec or {})}


def _seq(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
