"""Teacher-student distillation from a fixed, external teacher (offline KD)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.checkpoints import ALIASES, ALIGNER, CLASSIFIER, load_trained_module
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import FeatureClassifier, StrategyHost, require
from mneme.callbacks.base import ExperienceCallback
from mneme.callbacks.run_context import input_normalization
from mneme.callbacks.strategies.lwf import distillation_loss
from torch import Tensor, nn

PROJECTION = "distillation_projection"  # the module attribute of the learned projection


def hinton_kd(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s KD loss ``T² · KL(softmax(t/T) || softmax(s/T))`` (batch mean): LwF's
    :func:`~.lwf.distillation_loss` times ``T²``, which keeps the gradient's
    scale independent of ``T``."""
    return temperature**2 * distillation_loss(student, teacher, temperature)


class TeacherDistillation(ExperienceCallback):
    """Distil a frozen external teacher into the model being trained, as the loss term
    ``teacher`` (unlike LwF, which distils the model's own past)::

        alpha * T² · KL(softmax(t/T) || softmax(s/T))  +  beta * MSE(P(f_s), f_t)

    with ``s``/``t`` the raw logits of every head (``head(features)``) of student and teacher,
    ``f_s``/``f_t`` their features and ``P`` a learned linear projection from the student's
    width to the teacher's (identity when they are equal).

    The teacher: a Mneme checkpoint (``teacher_checkpoint``, loaded with
    ``weights_only=True`` and its class path checked, as ``mneme fit --ckpt_path``; logits
    and features), a timm model (``teacher_encoder``, through Mneme's ``create_backbone``:
    a timm name, ``teacher_encoder_weights`` a local file or a ``package:`` path; features
    only, so ``alpha`` must be 0), or the visual tower of an open_clip model
    (``teacher_open_clip``: an ``open_clip.list_models()`` name, ``teacher_open_clip_weights``
    a local file; features only; it gets the stream's inputs with their standardization
    undone, in ``[0, 1]``, resized and normalized as its preprocessing would). Exactly one
    of the three. Frozen, in eval mode, never in the checkpoint. A teacher that cannot take
    the stream's inputs is refused at setup in one line.

    The projection is a ``torch.nn.LazyLinear`` registered as the submodule
    ``distillation_projection`` of the LightningModule in ``setup``, i.e. before
    ``configure_optimizers``: the optimizer gets it with the module's parameters, it trains,
    and it is saved in (and restored from) the module's checkpoint. When the widths are equal
    it starts as the identity (plain feature MSE at first) and is learned as well. It
    composes with ``ProgressiveUnfreezing`` (which only (un)freezes the encoder's layers:
    the projection trains from the first step, also while the encoder is frozen).

    Args:
        teacher_checkpoint: a Mneme ``ContinualClassifier`` checkpoint.
        teacher_encoder: a timm model name (instead of a checkpoint).
        teacher_encoder_args: its keyword arguments.
        teacher_encoder_weights: a local weights file or ``package:`` path for it.
        teacher_open_clip: an open_clip model name whose visual tower is the teacher.
        teacher_open_clip_weights: a local open_clip checkpoint for it (none: random init).
        alpha: weight of the logit KD (``>= 0``).
        beta: weight of the feature distillation (``>= 0``).
        temperature: softmax temperature ``T`` (``> 0``).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.TeacherDistillation
              init_args: {teacher_checkpoint: checkpoints/teacher.ckpt, alpha: 1.0,
                          beta: 0.5, temperature: 4.0}
    """

    def __init__(
        self,
        teacher_checkpoint: str | None = None,
        teacher_encoder: str | None = None,
        teacher_encoder_args: dict[str, Any] | None = None,
        teacher_encoder_weights: str | None = None,
        teacher_open_clip: str | None = None,
        teacher_open_clip_weights: str | None = None,
        alpha: float = 1.0,
        beta: float = 0.0,
        temperature: float = 2.0,
    ) -> None:
        if not temperature > 0:
            raise ConfigError(
                f"TeacherDistillation.temperature: must be positive, got {temperature}"
            )
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0:
                raise ConfigError(f"TeacherDistillation.{name}: must be >= 0, got {value}")
        sources = [teacher_checkpoint, teacher_encoder, teacher_open_clip]
        if sum(s is not None for s in sources) != 1:
            raise ConfigError(
                "TeacherDistillation.teacher_checkpoint: give a Mneme checkpoint, "
                "teacher_encoder (a timm name) or teacher_open_clip, exactly one"
            )
        if teacher_checkpoint is None and alpha > 0:
            which = "teacher_encoder" if teacher_encoder is not None else "teacher_open_clip"
            raise ConfigError(
                f"TeacherDistillation.alpha: a {which} has features but no class head; "
                "set alpha: 0 (feature distillation, beta > 0) or give teacher_checkpoint"
            )
        if alpha == 0 and beta == 0:
            raise ConfigError("TeacherDistillation.alpha: alpha and beta are both 0; raise one")
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_encoder = teacher_encoder
        self.teacher_encoder_args = dict(teacher_encoder_args or {})
        self.teacher_encoder_weights = teacher_encoder_weights
        self.teacher_open_clip = teacher_open_clip
        self.teacher_open_clip_weights = teacher_open_clip_weights
        self._pixels: tuple[Tensor, Tensor] | None = None  # the stream's (mean, std)
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.teacher: nn.Module | None = None
        self.teacher_width: int | None = None
        self._module: LightningModule | None = None
        self._term: str | None = None

    # -- the teacher ------------------------------------------------------------------------
    def _input_shape(self, trainer: Trainer, key: str) -> tuple[int, ...]:
        return tuple(trainer.datamodule.train_experiences[0].field_shape(key))

    def build_teacher(self, trainer: Trainer, input_key: str) -> nn.Module:
        if self.teacher_checkpoint is not None:
            teacher = load_trained_module(  # safe load, class path checked as text
                self.teacher_checkpoint,
                (CLASSIFIER, ALIGNER),
                ALIASES,
                "TeacherDistillation.teacher_checkpoint",
                "a teacher",
            )
            if not hasattr(teacher, "head"):
                raise ConfigError(
                    "TeacherDistillation.teacher_checkpoint: a ContinualClassifier's, got "
                    f"{type(teacher).__name__}'s"
                )
        elif self.teacher_open_clip is not None:
            from mneme.app.nn.encoder_registry import encoder_class

            teacher = encoder_class("open_clip_visual")(
                None, model=self.teacher_open_clip, weights=self.teacher_open_clip_weights
            )
        else:
            from mneme.app.nn.backbones import create_backbone

            teacher = create_backbone(
                self.teacher_encoder,
                self._input_shape(trainer, input_key),
                self.teacher_encoder_args,
                weights=self.teacher_encoder_weights,
                field="TeacherDistillation.teacher_encoder",
            )
        return teacher.eval().requires_grad_(False)

    def teacher_outputs(self, x: Tensor, task: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The teacher's features and raw logits (``None`` for a timm encoder)."""
        teacher = self.teacher
        if self.teacher_open_clip is not None:
            if self._pixels is not None:  # open_clip preprocesses [0, 1] pixels itself
                mean, std = (v.to(x) for v in self._pixels)
                x = x * std + mean
            return teacher(x), None
        if self.teacher_checkpoint is None:
            return teacher(x), None
        features = teacher.features(x, task)
        return features, teacher.head(features)

    # -- the loss term ----------------------------------------------------------------------
    def distillation(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> Tensor:
        module = self._module
        x, task = batch[module.input_key], batch.get("task")
        with torch.no_grad():
            t_features, t_logits = self.teacher_outputs(x, task)
        loss = outputs["features"].new_zeros(())
        if self.alpha > 0:
            student = module.head(outputs["features"])
            loss = loss + self.alpha * hinton_kd(student, t_logits, self.temperature)
        if self.beta > 0:
            projection = getattr(module, PROJECTION)
            if isinstance(projection, nn.modules.lazy.LazyModuleMixin) and (
                projection.has_uninitialized_params()
            ):  # the first step of a run (a restored projection is materialized already)
                self._identity_if_equal(projection, outputs["features"].flatten(1))
            projected = projection(outputs["features"].flatten(1))
            loss = loss + self.beta * F.mse_loss(projected, t_features.flatten(1))
        return loss

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = pl_module
        require(pl_module, StrategyHost, "TeacherDistillation")
        if self.teacher is None:
            self.teacher = self.build_teacher(trainer, getattr(pl_module, "input_key", "image"))
            x = trainer.datamodule.train_experiences[0].first_sample()
            key = getattr(pl_module, "input_key", "image")
            self._pixels = self._stream_normalization(trainer, pl_module, x[key])
            try:
                with torch.no_grad():
                    features, _ = self.teacher_outputs(x[key], x.get("task"))
            except (RuntimeError, ValueError) as err:  # e.g. torch's shape mismatch
                first = str(err).strip().splitlines()[0]
                raise ConfigError(
                    f"TeacherDistillation.{self._source_field()}: the teacher cannot take the "
                    f"stream's '{key}' inputs of shape {tuple(x[key].shape[1:])} ({first}); "
                    "use a teacher trained on inputs of this shape"
                ) from err
            self.teacher_width = int(features.flatten(1).shape[1])
        if self.beta > 0 and not hasattr(pl_module, PROJECTION):
            # Registered now, before configure_optimizers, so the optimizer gets it; lazy,
            # since the student's width is known only once the module builds in its setup.
            pl_module.add_module(PROJECTION, nn.LazyLinear(self.teacher_width))
        self._term = pl_module.add_loss_term("teacher", self.distillation)

    def _source_field(self) -> str:
        if self.teacher_checkpoint is not None:
            return "teacher_checkpoint"
        return "teacher_encoder" if self.teacher_encoder is not None else "teacher_open_clip"

    @staticmethod
    def _stream_normalization(
        trainer: Trainer, pl_module: LightningModule, x: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """The stream's ``(mean, std)`` (as the attacks read it), shaped for ``x``."""
        norm = input_normalization(trainer, pl_module)
        if norm is None:
            return None
        mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in norm)
        shape = (1, -1) + (1,) * (x.dim() - 2) if mean.numel() > 1 else ()
        return (mean.view(shape), std.view(shape)) if shape else (mean, std)

    def _identity_if_equal(self, projection: nn.Module, features: Tensor) -> None:
        """Materialize the lazy projection; the identity when the widths are equal."""
        with torch.no_grad():
            projection(features[:1].detach())
            if projection.in_features == projection.out_features:
                projection.weight.copy_(torch.eye(projection.in_features))
                projection.bias.zero_()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        require(pl_module, FeatureClassifier, "TeacherDistillation")
        self.teacher.to(pl_module.device)
        if self.alpha > 0:
            ours = pl_module.head.out_features
            theirs = self.teacher.head.out_features
            if ours != theirs:
                raise ConfigError(
                    f"TeacherDistillation.alpha: the teacher has {theirs} logits, the model "
                    f"{ours} (num_classes x heads); logit KD needs the same classes: use a "
                    "teacher trained on this stream, or alpha: 0 with beta > 0 (features)"
                )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.teacher.eval()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._term is not None:
            pl_module.remove_loss_term(self._term)
            self._term = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            teacher=self.teacher_checkpoint or self.teacher_encoder or self.teacher_open_clip,
            temperature=self.temperature,
        )
