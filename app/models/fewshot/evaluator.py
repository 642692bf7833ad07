"""Few-shot evaluation of a trained model: a checkpoint of a
:class:`~mneme.app.ContinualClassifier` or a :class:`~mneme.app.ContrastiveAligner`,
on N-way K-shot test episodes of classes it never saw.

Methods (``methods``, each reported per evaluation setting of the datamodule):

- ``prototypes``: the frozen model's features (the classifier's encoder features, the
  aligner's normalized embeddings of ``input_key``); each class's prototype is the mean of
  its support features, each query goes to the nearest (``metric``). The same
  :func:`mneme.app.nn.heads.prototypes.class_means` / ``prototype_logits`` as the prototype heads.
- ``finetune``: a linear head (zero-initialized, so the result is deterministic) trained
  ``finetune_steps`` full-batch Adam steps at ``finetune_lr`` on the support set's
  features, then the query accuracy (the "Baseline" of Chen et al. 2019). With
  ``finetune_encoder`` a copy of the encoder trains too, one episode at a time (it stays
  in eval mode: its norm statistics are not re-estimated from a few shots); the loaded
  model itself never changes.
- ``zero_shot`` (aligner only): class-name prompts of each episode's classes (the
  datamodule's ``class_names`` by global class id, or ``class_names`` here) through the
  aligner's text tower, the mean of the normalized template embeddings, cosine against the
  query embeddings; no support sample is used, so it is the zero-shot figure beside the
  1-shot and 5-shot ones on the same episodes.

Gradients inside evaluation: Lightning runs ``test`` under ``torch.inference_mode`` (and
with gradients off). ``finetune`` opens ``torch.inference_mode(False)`` and
``torch.enable_grad()`` around its optimization and clones the features it trains on
(tensors made under inference mode cannot be saved for backward; a clone made outside it is
an ordinary tensor). So any trainer works, ``inference_mode`` true or false, and nothing of
the trainer's configuration has to change.

``episode_accuracies`` holds one ``torchmetrics.CatMetric`` per (method, setting): index
``m * len(settings) + s``, named by ``episode_methods`` and ``episode_settings``, which is
what :class:`mneme.callbacks.FewShotMetrics` reads.

Example (``mneme test --config configs/fewshot_digits.yaml``; no ``--ckpt_path``: the
checkpoint is this module's own argument)::

    model:
      class_path: mneme.app.FewShotEvaluator
      init_args:
        checkpoint: logs/quickstart/version_0/checkpoints/last.ckpt
        methods: [prototypes, finetune]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from mneme.app.core.checkpoints import ALIASES, ALIGNER, CLASSIFIER, load_trained_module
from mneme.app.core.errors import ConfigError
from mneme.app.nn.heads.prototypes import METRICS, class_means, prototype_logits
from mneme.datamodules.fewshot.meta_batches import (
    Episodes,
    encode_episodes,
    episode_metrics,
    eval_settings_of,
    n_way_of,
    record_accuracies,
)
from torch import Tensor, nn

METHODS = ("zero_shot", "prototypes", "finetune")


def load_model(path: str) -> LightningModule:
    """A trained ContinualClassifier or ContrastiveAligner from its checkpoint, refused in
    one line when it is another module's, unsafe (``weights_only``) or unreadable."""
    return load_trained_module(
        path, (CLASSIFIER, ALIGNER), ALIASES, "model.checkpoint", "few-shot evaluation"
    )


class FewShotEvaluator(LightningModule):
    """Evaluates a trained ContinualClassifier or ContrastiveAligner on the datamodule's
    N-way K-shot test episodes (see the module's description).

    Args:
        checkpoint: the trained model's checkpoint file.
        methods: among ``prototypes``, ``finetune`` and, for an aligner, ``zero_shot``;
            default every method the model supports.
        metric: ``cosine`` or ``euclidean``, for ``prototypes``.
        finetune_steps: optimization steps of ``finetune`` on each support set.
        finetune_lr: Adam's learning rate for ``finetune``.
        finetune_encoder: ``finetune`` trains (a copy of) the encoder too, not only the head.
        class_names: names of the datamodule's classes by global id, for ``zero_shot``
            (default: the datamodule's ``class_names``).
        prompt_templates: templates with ``{}`` for ``zero_shot`` (default: the
            datamodule's, else the aligner's, else ``{}``).
    """

    def __init__(
        self,
        checkpoint: str,
        methods: Sequence[str] | None = None,
        metric: str = "cosine",
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_encoder: bool = False,
        class_names: Sequence[str] | None = None,
        prompt_templates: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ConfigError(f"model.metric: one of {METRICS}, got {metric!r}")
        if finetune_steps < 1:
            raise ConfigError(f"model.finetune_steps: at least 1, got {finetune_steps}")
        if not finetune_lr > 0:
            raise ConfigError(f"model.finetune_lr: must be positive, got {finetune_lr}")
        self.save_hyperparameters(logger=False)
        self.checkpoint = checkpoint
        self.model = load_model(checkpoint)
        from mneme.app.models.aligner import ContrastiveAligner

        self.is_aligner = isinstance(self.model, ContrastiveAligner)
        supported = METHODS if self.is_aligner else METHODS[1:]
        methods = list(methods) if methods is not None else list(supported)
        wrong = [m for m in methods if m not in supported]
        if wrong or not methods or len(set(methods)) != len(methods):
            kind = type(self.model).__name__
            raise ConfigError(
                f"model.methods: a {kind} is evaluated by {', '.join(supported)} (each once); "
                f"got {methods}"
            )
        self.episode_methods = methods
        self.episode_settings: list[tuple[int, int]] = []
        self.episode_accuracies = episode_metrics(len(methods))
        self.input_key = self.model.input_key
        self._class_weights: Tensor | None = None

    # -- setup ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        theirs = tuple(datamodule.field_shape(self.input_key))
        hp = self.model.hparams
        ours = hp.input_shapes[self.input_key] if self.is_aligner else hp.input_shape
        if tuple(ours) != theirs:
            raise ConfigError(
                f"model.checkpoint: the model takes {self.input_key} samples of shape "
                f"{tuple(ours)}, the episodes' are {theirs}; evaluate it on episodes of the "
                "data it was made for"
            )
        self.episode_settings = eval_settings_of(datamodule)
        count = len(self.episode_methods) * len(self.episode_settings)
        self.episode_accuracies = episode_metrics(count).to(self.device)
        if "zero_shot" in self.episode_methods:
            self._prompt_tokens(datamodule)

    def _prompt_tokens(self, datamodule: Any) -> None:
        names = self.hparams.class_names or getattr(datamodule, "class_names", None)
        if not names:
            raise ConfigError(
                "model.class_names: zero_shot needs the name of every class of the episodes; "
                "the datamodule declares none: list them (one per class id)"
            )
        templates = (
            self.hparams.prompt_templates
            or getattr(datamodule, "prompt_templates", None)
            or getattr(self.model, "prompt_templates", None)
            or ["{}"]
        )
        if any("{}" not in t for t in templates):
            raise ConfigError(f"model.prompt_templates: each must contain '{{}}', got {templates}")
        text = self.model.encoders[self.model.text_key]
        texts = [t.format(name) for name in names for t in templates]
        tokens = text.backbone.tokenize(texts).view(len(names), len(templates), -1)
        self.register_buffer("prompt_tokens", tokens.to(self.device), persistent=False)

    # -- features -------------------------------------------------------------------------
    def encoder(self) -> nn.Module:
        """The module mapping a sample to its features: the classifier's encoder, the
        aligner's tower of ``input_key`` (normalized embeddings)."""
        return self.model.encoders[self.input_key] if self.is_aligner else self.model.encoder

    def features(self, x: Tensor, encoder: nn.Module | None = None) -> Tensor:
        if encoder is not None:
            return encoder(x)
        if self.is_aligner:
            return self.model.encoders[self.input_key](x)
        return self.model.features(x)

    def class_weights(self) -> Tensor:
        """Zero-shot weights ``(C, D)`` of every named class (computed once per epoch)."""
        if self._class_weights is None:
            from mneme.app.nn.retrieval import class_embeddings

            text = self.model.encoders[self.model.text_key]
            with torch.no_grad():
                self._class_weights = class_embeddings(text, self.prompt_tokens)
        return self._class_weights

    # -- the methods ----------------------------------------------------------------------
    def zero_shot(self, batch: Episodes, query: Tensor) -> Tensor:
        """Query logits ``(T, N*Q, N)`` against the prompts of each episode's classes."""
        weights = self.class_weights()
        classes = batch["classes"].to(weights.device).long()
        if int(classes.max()) >= len(weights):
            raise ConfigError(
                f"model.class_names: {len(weights)} names, but the episodes have class "
                f"{int(classes.max())}; name every class of the stream"
            )
        return F.normalize(query, dim=-1) @ weights[classes].transpose(1, 2)

    def prototypes(self, batch: Episodes, support: Tensor, query: Tensor) -> Tensor:
        n_way = n_way_of(batch)
        logits = []
        for s, y, q in zip(support, batch["support_label"], query, strict=True):
            means, _ = class_means(s, y, n_way)
            logits.append(prototype_logits(q, means, self.hparams.metric))
        return torch.stack(logits)

    def finetune(self, batch: Episodes, support: Tensor, query: Tensor) -> Tensor:
        """Query logits after training a head (and with ``finetune_encoder`` a copy of the
        encoder) on each episode's support set."""
        with torch.inference_mode(False), torch.enable_grad():
            if self.hparams.finetune_encoder:
                return torch.stack([self._finetune_encoder(batch, t) for t in range(len(support))])
            return self._finetune_heads(support.clone(), batch["support_label"].clone(), query)

    def _finetune_heads(self, support: Tensor, labels: Tensor, query: Tensor) -> Tensor:
        """All ``T`` episodes' heads at once: ``(T, N, D)`` weights, the sum of the per-task
        mean losses (each head's gradient is its own task's; Adam acts per element, so the
        tasks stay independent)."""
        t, _, d = support.shape
        n_way = int(labels.max()) + 1
        weight = support.new_zeros(t, n_way, d, requires_grad=True)
        bias = support.new_zeros(t, 1, n_way, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=self.hparams.finetune_lr)
        labels = labels.to(support.device).long()
        for _ in range(self.hparams.finetune_steps):
            logits = support @ weight.transpose(1, 2) + bias
            loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return query.clone() @ weight.transpose(1, 2) + bias

    def _finetune_encoder(self, batch: Episodes, t: int) -> Tensor:
        encoder = copy.deepcopy(self.encoder()).requires_grad_(True).eval()
        x = batch["support"][self.input_key][t].clone()
        labels = batch["support_label"][t].clone().long()
        q = batch["query"][self.input_key][t].clone()
        n_way = n_way_of(batch)
        with torch.no_grad():
            width = encoder(x[:1]).shape[-1]
        head = nn.Linear(width, n_way).to(x.device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        params = [*encoder.parameters(), *head.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.hparams.finetune_lr)
        for _ in range(self.hparams.finetune_steps):
            loss = F.cross_entropy(head(encoder(x)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return head(encoder(q))

    # -- evaluation -----------------------------------------------------------------------
    def test_step(self, batch: Episodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        support, query = encode_episodes(self.features, batch, self.input_key)
        labels = batch["query_label"].to(query.device)
        for m, method in enumerate(self.episode_methods):
            if method == "zero_shot":
                logits = self.zero_shot(batch, query)
            elif method == "prototypes":
                logits = self.prototypes(batch, support, query)
            else:
                logits = self.finetune(batch, support, query)
            index = m * len(self.episode_settings) + dataloader_idx
            record_accuracies(self.episode_accuracies[index], logits.argmax(-1) == labels, batch)

    validation_step = test_step

    def _reset(self) -> None:
        self._class_weights = None
        self.model.eval()
        for metric in self.episode_accuracies:
            metric.reset()

    def on_test_epoch_start(self) -> None:
        self._reset()

    def on_validation_epoch_start(self) -> None:
        self._reset()

    def configure_optimizers(self) -> list:
        return []  # nothing trains across episodes
