"""FusionClassifier: one classifier over paired inputs of several modalities (a spoken digit
and an image of it; an image and its caption), fusing their encoders by cross-attention or
by concatenation (late fusion).

Encoders are named per modality exactly as for :class:`mneme.app.ContrastiveAligner`
(:func:`mneme.app.nn.modalities.build_encoder`: ``type``, ``model``, ``args``, ``weights``,
...); the batch key is the modality. Two fusions, chosen by ``fusion``:

- ``late``: each encoder's own output vector, a linear map to ``embed_dim``, concatenated,
  ``LayerNorm``, then the head.
- ``cross_attention``: each encoder's *tokens* are mapped to ``embed_dim`` (plus a learned
  position embedding per token and one per modality); the tokens of every query modality
  (``queries``, default all) attend to the tokens of the other modalities through
  ``depth`` pre-norm blocks of ``torch.nn.MultiheadAttention`` and an MLP (each with a
  residual); each query modality's tokens are mean-pooled, the pools concatenated,
  ``LayerNorm``, then the head.

Tokens, where the encoder offers them
(:func:`mneme.app.nn.fusion_layers.encoder_tokens`): a timm model's
``forward_features`` (a ViT's patch and prefix tokens; a CNN's feature map, one token per
position); Mneme's ``mneme_cnn`` the map before its global pooling; audio (``log_mel``) the
CNN's map over the spectrogram averaged over frequency, one token per time frame; an
open_clip text tower its per-position outputs (``output_tokens``; padding masked). An
encoder that returns only a vector (``mneme_mlp``, ``hf_text``) gives one token.

A :class:`~mneme.app.models.base.ContinualModule`: Replay (any batch keys), EWC
(through :meth:`batch_logits`), ContinualMetrics and the other strategies that need no
single-input encoder work on it. Unseen classes are masked (as the classifier's shared
head); the task label is not used. ``head: {name: moe, ...}`` puts the mixture-of-experts
head (:mod:`mneme.app.nn.heads.moe`) on the fused vector.

Example (YAML)::

    model:
      class_path: mneme.app.FusionClassifier
      init_args:
        fusion: cross_attention          # or: late
        embed_dim: 64
        num_heads: 4
        encoders:
          audio: {model: mneme_cnn, args: {widths: [16, 32]}, n_mels: 32, hop_length: 128}
          image: {model: mneme_cnn, args: {widths: [16, 32]}}
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from mneme.app.core.errors import ConfigError
from mneme.app.core.metrics import ExperienceAccuracy
from mneme.app.core.schedule import is_experience_end
from mneme.app.models.base import Batch, ContinualModule
from mneme.app.models.head_hooks import HeadHooks
from mneme.app.models.prediction_rows import DEFAULT_TOP_K, class_rows
from mneme.app.nn.fusion_layers import CrossAttentionBlock, encoder_tokens, masked_mean
from mneme.app.nn.heads.registry import create_head, head_type
from mneme.app.nn.modalities import build_encoder
from torch import Tensor, nn

FUSIONS = ("cross_attention", "late")
FUSION_HEADS = ("linear", "routed")  # the registry's linear and MoE heads (no prototypes)
DEFAULT_ENCODERS = {
    "audio": {"model": "mneme_cnn", "args": {"widths": [16, 32]}, "n_mels": 32, "hop_length": 128},
    "image": {"model": "mneme_cnn", "args": {"widths": [16, 32]}},
}


# -- the module -------------------------------------------------------------------------------
class FusionClassifier(HeadHooks, ContinualModule):
    """Joint classifier over paired modalities (see the module docstring).

    Args:
        encoders: ``{modality: spec}`` (the modality is the batch key); at least two.
        fusion: ``cross_attention`` or ``late``.
        embed_dim: width of the tokens (cross-attention) or of each modality's vector (late).
        num_heads: attention heads (a divisor of ``embed_dim``).
        depth: cross-attention blocks per query modality.
        queries: the modalities whose tokens attend to the others' (default: all).
        dropout: dropout in attention and MLPs.
        head: ``{name: linear}`` (default) or ``{name: moe, ...}`` (:mod:`mneme.app.nn.heads.moe`).
        optimizer: optimizer class and arguments.
        reset_optimizer: clear the optimizer state at each experience start.
        mask_unseen_classes: restrict predictions to the classes seen so far.
        input_key: the modality strategies that read one input take (default: the first).
        num_classes, input_shapes: read from the datamodule when not given.
    """

    def __init__(
        self,
        encoders: dict[str, dict[str, Any]] | None = None,
        fusion: str = "cross_attention",
        embed_dim: int = 64,
        num_heads: int = 4,
        depth: int = 1,
        queries: Sequence[str] | None = None,
        dropout: float = 0.0,
        head: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        reset_optimizer: bool = False,
        mask_unseen_classes: bool = True,
        input_key: str | None = None,
        num_classes: int | None = None,
        input_shapes: dict[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__(optimizer, reset_optimizer)
        encoders = {m: dict(spec or {}) for m, spec in (encoders or DEFAULT_ENCODERS).items()}
        if fusion not in FUSIONS:
            close = difflib.get_close_matches(str(fusion), FUSIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"model.fusion: one of {', '.join(FUSIONS)}, got {fusion!r}{hint}")
        if len(encoders) < 2:
            raise ConfigError(
                f"model.encoders: fusion needs two or more modalities, got {sorted(encoders)}; "
                "for one, use mneme.app.ContinualClassifier"
            )
        queries = list(queries or encoders)
        if not queries or not set(queries) <= set(encoders):
            raise ConfigError(
                f"model.queries: modalities of model.encoders {sorted(encoders)}, got {queries}"
            )
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ConfigError(
                f"model.num_heads: must divide model.embed_dim ({embed_dim}), got {num_heads}"
            )
        if depth < 1:
            raise ConfigError(f"model.depth: at least 1 cross-attention block, got {depth}")
        head_type(head, roles=FUSION_HEADS)  # a name of the head registry, its arguments
        if input_key is not None and input_key not in encoders:
            raise ConfigError(f"model.input_key: one of {sorted(encoders)}, got {input_key!r}")
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.hparams.update(encoders=encoders, queries=queries)
        self.modalities = list(encoders)
        self.queries = queries
        self.input_key = input_key or self.modalities[0]
        self.encoders: nn.ModuleDict | None = None
        if num_classes is not None and input_shapes is not None:
            self._build(input_shapes, num_classes)

    # -- building -------------------------------------------------------------------------
    def _build(self, input_shapes: dict[str, Sequence[int]], num_classes: int) -> None:
        hp = self.hparams
        shapes = {m: list(input_shapes[m]) for m in self.modalities}
        self.hparams.update(input_shapes=shapes, num_classes=num_classes)
        self.num_classes = num_classes
        dim = hp.embed_dim
        # the registry's encoder classes (their projection to a shared space is not used)
        self.encoders = nn.ModuleDict(
            {m: build_encoder(m, hp.encoders[m], dim, shapes[m]).backbone for m in self.modalities}
        )
        if hp.fusion == "late":
            self.project = nn.ModuleDict(
                {m: nn.Linear(self.encoders[m].out_dim, dim) for m in self.modalities}
            )
            width = dim * len(self.modalities)
        else:
            probes = self._probe_tokens(shapes)
            self.project = nn.ModuleDict({m: nn.Linear(d, dim) for m, (_, d) in probes.items()})
            self.positions = nn.ParameterDict(
                {m: nn.Parameter(0.02 * torch.randn(1, t, dim)) for m, (t, _) in probes.items()}
            )
            self.modality_embedding = nn.ParameterDict(
                {m: nn.Parameter(0.02 * torch.randn(1, 1, dim)) for m in self.modalities}
            )
            self.blocks = nn.ModuleDict(
                {
                    q: nn.ModuleList(
                        CrossAttentionBlock(dim, hp.num_heads, hp.dropout) for _ in range(hp.depth)
                    )
                    for q in self.queries
                }
            )
            width = dim * len(self.queries)
        self.norm = nn.LayerNorm(width)
        self.head, _ = create_head(hp.head, width, num_classes, roles=FUSION_HEADS)
        self.register_buffer("class_mask", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def _probe_tokens(self, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        """Tokens and width per modality, from one pass over zeros (eval mode)."""
        found = {}
        for m, encoder in self.encoders.items():
            was_training = encoder.training
            tokens, _ = encoder_tokens(encoder.eval(), torch.zeros(2, *shapes[m]))
            encoder.train(was_training)
            found[m] = (tokens.shape[1], tokens.shape[2])
        return found

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        fields = datamodule.train_experiences[0].fields()
        for m in self.modalities:
            if m not in fields:
                raise ConfigError(
                    f"model.encoders.{m}: the stream has no field '{m}' (its fields: "
                    f"{fields}); fuse only modalities the stream provides, or use a stream "
                    f"with '{m}'"
                )
        if self.encoders is None:
            shapes = {m: datamodule.field_shape(m, f"model.encoders.{m}") for m in self.modalities}
            self._build(shapes, datamodule.num_classes)
        if datamodule.num_classes > self.num_classes:
            raise ConfigError(
                f"model.num_classes: the model has {self.num_classes}, the stream needs "
                f"{datamodule.num_classes}; use a model (or checkpoint) made for this stream"
            )
        self.experience_accuracy = ExperienceAccuracy(len(datamodule.test_experiences))
        self.head_hooks.add_loss_terms(self)

    # -- forward --------------------------------------------------------------------------
    def fuse(self, inputs: Batch) -> Tensor:
        """The fused vector of a batch (a dict with one key per modality)."""
        if self.hparams.fusion == "late":
            parts = [self.project[m](self.encoders[m](inputs[m])) for m in self.modalities]
            return self.norm(torch.cat(parts, dim=-1))
        tokens, padding = {}, {}
        for m in self.modalities:
            t, pad = encoder_tokens(self.encoders[m], inputs[m])
            tokens[m] = self.project[m](t) + self.positions[m] + self.modality_embedding[m]
            padding[m] = pad
        pooled = []
        for q in self.queries:
            others = [m for m in self.modalities if m != q]
            kv = torch.cat([tokens[m] for m in others], dim=1)
            kv_padding = None
            if any(padding[m] is not None for m in others):
                kv_padding = torch.cat(
                    [
                        padding[m]
                        if padding[m] is not None
                        else tokens[m].new_zeros(tokens[m].shape[:2], dtype=torch.bool)
                        for m in others
                    ],
                    dim=1,
                )
            x = tokens[q]
            for block in self.blocks[q]:
                x = block(x, kv, kv_padding)
            pooled.append(masked_mean(x, padding[q]))
        return self.norm(torch.cat(pooled, dim=-1))

    def logits(self, fused: Tensor) -> Tensor:
        """The head's logits, classes not seen yet masked."""
        logits = self.head(fused)
        if self.hparams.mask_unseen_classes:
            # no class seen yet: nothing masked (branch-free, so torch.export can trace it)
            mask: Tensor = self.class_mask  # type: ignore[assignment]  (a registered buffer)
            seen = torch.logical_or(mask, ~mask.any())
            logits = logits.masked_fill(~seen, torch.finfo(logits.dtype).min)
        return logits

    def forward(self, inputs: Batch, task: Tensor | None = None) -> Tensor:
        """Logits of a batch of paired inputs (``{modality: tensor}``)."""
        return self.logits(self.fuse(inputs))

    def batch_logits(self, batch: Batch) -> Tensor:
        """Logits of a training batch: what EWC's Fisher differentiates."""
        return self(batch)

    def observe_experience(self, classes: Sequence[int], tasks: Sequence[int]) -> None:
        self.class_mask[list(classes)] = True

    # -- training -------------------------------------------------------------------------
    def training_terms(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        fused = self.fuse(batch)
        logits = self.logits(fused)
        return self.classification_terms(logits, fused, batch)

    def on_train_epoch_end(self) -> None:
        if is_experience_end(self.trainer):
            self.end_head_experience()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("fusion", "queries", "embed_dim"):
            theirs, ours = saved.get(key), self.hparams.get(key)
            if theirs is not None and theirs != ours:
                raise ConfigError(
                    f"model.{key}: the checkpoint's model has {theirs!r}, this one {ours!r}; "
                    "use the config the checkpoint was trained with"
                )
        self.restore_head(checkpoint)

    # -- evaluation -----------------------------------------------------------------------
    predict_top_k = DEFAULT_TOP_K  # set by PredictionWriter (--predictions.top_k)

    def predict_step(
        self, batch: Batch, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """One row per sample, as the classifier's (``predicted``, ``top_classes``,
        ``top_probabilities``, ``label`` when known)."""
        missing = [m for m in self.modalities if m not in batch]
        if missing:
            raise ConfigError(
                f"data.predict_inputs: the fusion model needs every modality "
                f"{self.modalities}; the inputs lack {missing}: predict on the stream"
            )
        return class_rows(self(batch), self.predict_top_k, batch)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.experience_accuracy.update(self(batch).argmax(dim=1), batch["label"], dataloader_idx)

    test_step = validation_step
