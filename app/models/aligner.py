"""ContrastiveAligner: N modality encoders aligned in one embedding space by InfoNCE."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from mneme.app.core.errors import ConfigError
from mneme.app.core.metrics import ExperienceAccuracy
from mneme.app.models.base import Batch, ContinualModule
from mneme.app.models.prediction_rows import DEFAULT_TOP_K, class_rows
from mneme.app.nn.losses import AlignmentLoss
from mneme.app.nn.modalities import build_encoders
from mneme.app.nn.retrieval import CrossModalRecall, class_embeddings
from torch import Tensor, nn

DEFAULT_ENCODERS = {"image": {"model": "mneme_mlp"}, "text": {"model": "mneme-tiny-clip"}}
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps logit_scale to [0, log(100)]


class ContrastiveAligner(ContinualModule):
    """Align modalities (image, text, audio, ...) in one ``D``-dimensional, L2-normalized
    space with a symmetric InfoNCE per modality pair (open_clip's ``ClipLoss``, with
    ``gather_with_grad`` so negatives are global under DDP).

    Each pair ``(a, b)`` has a learnable temperature ``logit_scale`` initialized to
    ``log(1/0.07)`` and clamped to ``[0, log(100)]`` after every step, as open_clip does.
    With ``label_aware`` every pair sharing a class in the (global) batch is a positive.

    Follows the ContinualClassifier protocol, so ContinualMetrics and the strategy callbacks
    apply: ``experience_accuracy`` is the zero-shot accuracy of ``zero_shot_modality``
    (class-prompt embeddings: the mean of normalized template embeddings, re-normalized) per
    test experience; ``loss_terms``/``batch_transforms`` extension points; ``forward(x,
    task)`` returns zero-shot logits of ``input_key`` (so EWC's cross-entropy Fisher works);
    training ``outputs`` hold ``logits`` (the first pair's similarity logits) and
    ``embeddings`` (per modality). Validation logs ``val/recall@<k>_<a>_to_<b>``.

    Class names and prompt templates come from the stream's declaration
    (:class:`mneme.datamodules.streams.declared.DeclaredStream`, as the built-in captioned streams
    return) unless given; a stream without names needs ``class_names``.

    Args:
        encoders: ``{modality: spec}``; the modality is the batch key; see
            :func:`mneme.app.nn.modalities.build_encoder` for the spec.
        pairs: modality pairs to align; default every pair of ``encoders``.
        embed_dim: width ``D`` of the shared space.
        label_aware: same-class pairs are positives (multi-positive InfoNCE).
        learn_logit_scale: learn the temperature (else fixed at its initial value).
        optimizer: optimizer class and arguments; no weight decay on gains, biases and
            temperatures (open_clip's rule).
        reset_optimizer: clear the optimizer state at each experience start.
        text_key: the modality whose encoder embeds class prompts.
        zero_shot_modality: the modality classified zero-shot into ``experience_accuracy``;
            default the first non-text encoder. Other non-text modalities are logged as
            ``val/zero_shot_<modality>_exp<j>``.
        class_names, prompt_templates: override the stream's (templates contain ``{}``).
        mask_unseen_classes: zero-shot over the classes trained so far only.
        recall_ks: the K of Recall@K.
        recall_by_label: a retrieval hits when it finds the same class (for captions that
            repeat per class), not only the paired item.
        input_shapes, num_classes: read from the datamodule when not given.
        compile: ``torch.compile`` every modality tower in place (``true``, or
            torch.compile's arguments ``{mode: max-autotune, fullgraph: false, dynamic:
            false}``), and the strategies' loss terms unless ``loss_terms: false``; see
            :meth:`ContinualModule.configure_model`. On a GPU pair it with
            ``trainer.precision: bf16-mixed``.

    Example (YAML)::

        model:
          class_path: mneme.app.ContrastiveAligner
          init_args:
            embed_dim: 64
            encoders:
              image: {model: mneme_mlp, args: {hidden: [256]}}
              text: {model: mneme-tiny-clip}
            pairs: [[image, text]]
            label_aware: true
            optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.001}}
    """

    def __init__(
        self,
        encoders: dict[str, dict[str, Any]] | None = None,
        pairs: Sequence[Sequence[str]] | None = None,
        embed_dim: int = 64,
        label_aware: bool = False,
        learn_logit_scale: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        reset_optimizer: bool = False,
        text_key: str = "text",
        zero_shot_modality: str | None = None,
        class_names: Sequence[str] | None = None,
        prompt_templates: Sequence[str] | None = None,
        mask_unseen_classes: bool = False,
        recall_ks: Sequence[int] = (1, 5, 10),
        recall_by_label: bool = False,
        input_shapes: dict[str, Sequence[int]] | None = None,
        num_classes: int | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(optimizer, reset_optimizer, compile)
        encoders = dict(encoders or DEFAULT_ENCODERS)
        if text_key not in encoders:
            raise ConfigError(
                f"model.encoders: zero-shot accuracy (the accuracy matrix) needs a text encoder "
                f"under '{text_key}' (model.text_key); got {sorted(encoders)}"
            )
        pairs = [tuple(p) for p in (pairs or itertools.combinations(encoders, 2))]
        for pair in pairs:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(encoders):
                raise ConfigError(
                    f"model.pairs: each pair names two different modalities of model.encoders "
                    f"{sorted(encoders)}, got {list(pair)}"
                )
        queries = [m for m in encoders if m != text_key]
        zero_shot_modality = zero_shot_modality or (queries[0] if queries else None)
        if zero_shot_modality not in queries:
            raise ConfigError(
                f"model.zero_shot_modality: one of the non-text encoders {queries}, "
                f"got {zero_shot_modality!r}"
            )
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.hparams.update(encoders=encoders, pairs=[list(p) for p in pairs])
        self.pairs = pairs
        self.text_key = text_key
        self.input_key = zero_shot_modality  # what EWC/replay-style callbacks read
        self.zero_shot_queries = [zero_shot_modality] + [q for q in queries if q != self.input_key]
        self.encoders: nn.ModuleDict | None = None
        self.loss_fn = AlignmentLoss(gather_with_grad=True)
        self._zero_shot_weights: Tensor | None = None  # cached between training steps
        if input_shapes is not None and num_classes is not None:
            self._build(input_shapes, num_classes)

    # -- building -------------------------------------------------------------------------
    def _build(self, input_shapes: dict[str, Sequence[int]], num_classes: int) -> None:
        shapes = {m: list(s) for m, s in input_shapes.items()}
        self.hparams.update(input_shapes=shapes, num_classes=num_classes)
        self.num_classes = num_classes
        self.encoders = build_encoders(self.hparams.encoders, self.hparams.embed_dim, shapes)
        self.logit_scales = nn.ParameterDict(
            {
                self.pair_name(p): nn.Parameter(
                    torch.tensor(INIT_LOGIT_SCALE), requires_grad=self.hparams.learn_logit_scale
                )
                for p in self.pairs
            }
        )
        self.register_buffer("class_mask", torch.zeros(num_classes, dtype=torch.bool))
        self.recall = nn.ModuleDict(
            {
                self.pair_name(p): CrossModalRecall(
                    self.hparams.recall_ks, by_label=self.hparams.recall_by_label
                )
                for p in self.pairs
            }
        )

    def compiled_modules(self) -> list[nn.Module]:
        return list(self.encoders.values())

    @staticmethod
    def pair_name(pair: Sequence[str]) -> str:
        return f"{pair[0]}_{pair[1]}"

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        datamodule = trainer.datamodule
        if self.encoders is None:
            shapes = {
                m: datamodule.field_shape(m, f"model.encoders.{m}") for m in self.hparams.encoders
            }
            self._build(shapes, datamodule.num_classes)
        self.set_prompts(*self._prompts_from(datamodule))
        num_test = len(datamodule.test_experiences)
        self.experience_accuracy = ExperienceAccuracy(num_test)
        self.other_zero_shot = nn.ModuleDict(
            {q: ExperienceAccuracy(num_test) for q in self.zero_shot_queries[1:]}
        )
        self.loss_fn = AlignmentLoss(
            gather_with_grad=True, rank=trainer.global_rank, world_size=trainer.world_size
        )

    def _prompts_from(self, datamodule) -> tuple[list[str], list[str]]:
        """The config's prompts, else the stream's declared ones (``DeclaredStream``)."""
        names = self.hparams.class_names or getattr(datamodule, "class_names", None)
        if not names:
            raise ConfigError(
                "model.class_names: the stream declares no class names for zero-shot prompts; "
                f"list {self.num_classes} of them (one per class index)"
            )
        templates = self.hparams.prompt_templates or getattr(datamodule, "prompt_templates", None)
        return list(names), list(templates or ["{}"])

    def set_prompts(self, class_names: Sequence[str], templates: Sequence[str]) -> None:
        """Tokenize ``template.format(name)`` for every class and template (``(C, T, L)``)."""
        if len(class_names) < self.num_classes:
            raise ConfigError(
                f"model.class_names: {len(class_names)} names for {self.num_classes} classes"
            )
        if not templates or any("{}" not in t for t in templates):
            raise ConfigError(f"model.prompt_templates: each must contain '{{}}', got {templates}")
        encoder = self.encoders[self.text_key].backbone
        texts = [t.format(name) for name in class_names[: self.num_classes] for t in templates]
        tokens = encoder.tokenize(texts).view(self.num_classes, len(templates), -1)
        self.class_names, self.prompt_templates = list(class_names), list(templates)
        self.register_buffer("prompt_tokens", tokens.to(self.class_mask.device), persistent=False)
        self._zero_shot_weights = None

    # -- embeddings -----------------------------------------------------------------------
    def embed(self, batch: Batch, modalities: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Normalized embeddings ``{modality: (N, D)}`` of the batch's modalities."""
        modalities = modalities or [m for m in self.encoders if m in batch]
        return {m: self.encoders[m](batch[m]) for m in modalities}

    def class_embeddings(self, text_encoder: nn.Module | None = None) -> Tensor:
        """Zero-shot class weights ``(C, D)`` from the prompts (with gradients)."""
        return class_embeddings(text_encoder or self.encoders[self.text_key], self.prompt_tokens)

    def zero_shot_logits(self, queries: Tensor, weights: Tensor) -> Tensor:
        logits = queries @ weights.T
        if self.hparams.mask_unseen_classes and bool(self.class_mask.any()):
            logits = logits.masked_fill(~self.class_mask, torch.finfo(logits.dtype).min)
        return logits

    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """Zero-shot logits (temperature-scaled) of ``input_key`` inputs over the classes."""
        scale = self._scale_for(self.input_key).exp()
        return scale * self.zero_shot_logits(
            self.encoders[self.input_key](x), self.class_embeddings()
        )

    def _scale_for(self, modality: str) -> Tensor:
        for pair in self.pairs:
            if set(pair) == {modality, self.text_key}:
                return self.logit_scales[self.pair_name(pair)]
        return next(iter(self.logit_scales.values()))

    # -- training -------------------------------------------------------------------------
    def contrastive_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor], dict]:
        """Mean InfoNCE over the pairs, the per-pair losses, and the embeddings."""
        modalities = list(dict.fromkeys(m for p in self.pairs for m in p))
        emb = self.embed(batch, modalities)
        labels = batch["label"] if self.hparams.label_aware else None
        losses = {
            self.pair_name(p): self.loss_fn(
                emb[p[0]], emb[p[1]], self.logit_scales[self.pair_name(p)].exp(), labels
            )
            for p in self.pairs
        }
        return torch.stack(list(losses.values())).mean(), losses, emb

    def training_terms(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Any]]:
        loss, losses, emb = self.contrastive_loss(batch)
        a, b = self.pairs[0]
        first = self.logit_scales[self.pair_name(self.pairs[0])].exp() * emb[a] @ emb[b].T
        if self.is_logging_step():
            logs = {}
            for name, value in losses.items():
                logs[f"train/loss_infonce_{name}"] = value
                logs[f"train/logit_scale_{name}"] = self.logit_scales[name].exp()
            self.log_dict(logs, batch_size=len(batch["label"]))
        return {"infonce": loss}, {"logits": first, "embeddings": emb}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            for scale in self.logit_scales.values():
                scale.clamp_(0, MAX_LOGIT_SCALE)
        self._zero_shot_weights = None  # the towers changed

    def observe_experience(self, classes: Sequence[int], tasks: Sequence[int]) -> None:
        self.class_mask[list(classes)] = True

    def optimizer_parameters(self) -> list[dict]:
        # open_clip's rule: no weight decay on gains, biases and temperatures (ndim < 2).
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    # -- evaluation -----------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        emb = self.embed(batch)
        labels = batch["label"]
        for pair in self.pairs:
            self.recall[self.pair_name(pair)].update(emb[pair[0]], emb[pair[1]], labels)
        if self._zero_shot_weights is None:
            self._zero_shot_weights = self.class_embeddings().detach()
        metrics = {self.input_key: self.experience_accuracy, **self.other_zero_shot}
        for query, metric in metrics.items():
            if query in emb:
                preds = self.zero_shot_logits(emb[query], self._zero_shot_weights).argmax(1)
                metric.update(preds, labels, dataloader_idx)

    test_step = validation_step

    predict_top_k = DEFAULT_TOP_K  # set by PredictionWriter (--predictions.top_k)

    def predict_step(
        self, batch: Batch, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """One row per sample (``mneme predict``): ``embedding_<modality>`` (the normalized
        embedding, a list of floats) for each modality of the batch the model encodes, and
        the zero-shot class prediction of ``input_key`` over the class prompts
        (``predicted``, ``top_classes``, ``top_probabilities``, ``label`` when known)."""
        emb = self.embed(batch)
        if not emb:
            raise ConfigError(
                f"data.predict_inputs: the inputs hold none of the model's modalities "
                f"{list(self.encoders)}; predict on the stream, or give inputs of them"
            )
        n = len(next(iter(emb.values())))
        rows: list[dict[str, Any]] = [{} for _ in range(n)]
        for modality, vectors in emb.items():
            for row, vector in zip(rows, vectors.detach().float().tolist(), strict=True):
                row[f"embedding_{modality}"] = vector
        if self.input_key in emb and getattr(self, "prompt_tokens", None) is not None:
            scale = self._scale_for(self.input_key).exp()
            logits = scale * self.zero_shot_logits(emb[self.input_key], self.class_embeddings())
            for row, guess in zip(rows, class_rows(logits, self.predict_top_k, batch), strict=True):
                row.update(guess)
        return rows

    def _reset_eval_metrics(self) -> None:
        self._zero_shot_weights = None
        for metric in [*self.recall.values(), *self.other_zero_shot.values()]:
            metric.reset()

    def _log_eval_metrics(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        values = {}
        for pair in self.pairs:
            metric = self.recall[self.pair_name(pair)]
            if not metric.update_called:
                continue
            # torchmetrics squeezes one-element results to scalars (one k, one experience)
            forward, backward = (torch.atleast_1d(t).tolist() for t in metric.compute())
            for k, f, b in zip(metric.ks, forward, backward, strict=True):
                values[f"{stage}/recall@{k}_{pair[0]}_to_{pair[1]}"] = f
                values[f"{stage}/recall@{k}_{pair[1]}_to_{pair[0]}"] = b
        for query, metric in self.other_zero_shot.items():
            accuracy = torch.atleast_1d(metric.compute()).tolist()
            values.update({f"{stage}/zero_shot_{query}_exp{j}": a for j, a in enumerate(accuracy)})
        values = {k: v for k, v in values.items() if not math.isnan(v)}
        if values:
            self.log_dict(values, sync_dist=True)  # already synced by the metrics
        self._reset_eval_metrics()

    def on_validation_epoch_start(self) -> None:
        self._reset_eval_metrics()  # drops what an out-of-loop evaluation left

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._reset_eval_metrics()

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")
