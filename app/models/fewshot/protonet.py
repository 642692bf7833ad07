"""Prototypical networks (Snell et al. 2017): episodic training and evaluation.

A class's prototype is the mean embedding of its support samples; a query is scored by the
negative squared Euclidean distance to each prototype (``metric: euclidean``, the paper's) or
by the cosine similarity divided by ``temperature`` (``metric: cosine``). Prototypes and
scores are :func:`mneme.app.nn.heads.prototypes.class_means` and
:func:`~mneme.app.nn.heads.prototypes.prototype_logits`, the same code as the prototype heads of
the continual classifier (NCM, SimpleCIL): there is no second prototype implementation.

Meta-batches are those of :class:`mneme.datamodules.EpisodicDataModule`: ``support`` /
``query`` ``{field: (T, N*K | N*Q, *shape)}``, ``support_label`` / ``query_label`` local
labels ``0..N-1``, ``classes`` ``(T, N)``. Training minimizes the query cross-entropy, mean
over the ``T`` tasks; validation and test put each episode's query accuracy into
``episode_accuracies[dataloader_idx]`` (one ``torchmetrics.CatMetric`` per evaluation
setting, as the MAML module does), which :class:`mneme.callbacks.FewShotMetrics` reports as
mean and 95% confidence interval per N-way K-shot setting.

Example (YAML)::

    model:
      class_path: mneme.app.PrototypicalNetwork
      init_args:
        encoder: mneme_cnn
        metric: euclidean
        optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from mneme.app.core.errors import ConfigError
from mneme.app.finetuning.adaptation import freeze_norm_statistics
from mneme.app.nn.backbones import backbone_from_hparams
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


# -- the module -----------------------------------------------------------------------------
class PrototypicalNetwork(LightningModule):
    """A prototypical network over a timm encoder, trained and evaluated on episodes.

    Args:
        encoder: a timm model name (``mneme_mlp``, ``mneme_cnn``, ``resnet18``, ...), built by
            :func:`mneme.app.nn.backbones.create_backbone` as the classifier's encoder is.
        encoder_args, encoder_weights, encoder_weights_keys, encoder_pretrained,
        encoder_input_size: as :class:`mneme.app.ContinualClassifier`'s.
        freeze_encoder: train no weight of the encoder (its norm statistics stay too); with
            nothing to train the fit only evaluates.
        metric: ``euclidean`` (negative squared distance, Snell et al.) or ``cosine``.
        temperature: cosine logits are ``cos / temperature`` (ignored for ``euclidean``).
        optimizer: optimizer class and arguments.
        input_key: the episode field the encoder reads (default: the datamodule's).
        input_shape: one sample's shape (default: the datamodule's ``field_shape``).
    """

    def __init__(
        self,
        encoder: str = "mneme_mlp",
        encoder_args: dict[str, Any] | None = None,
        encoder_weights: str | None = None,
        encoder_weights_keys: str = "exact",
        encoder_pretrained: bool | str | None = None,
        encoder_input_size: Sequence[int] | None = None,
        freeze_encoder: bool = False,
        metric: str = "euclidean",
        temperature: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.Adam,
        input_key: str | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ConfigError(f"model.metric: one of {METRICS}, got {metric!r}")
        if not temperature > 0:
            raise ConfigError(f"model.temperature: must be positive, got {temperature}")
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.optimizer_factory = optimizer
        self.metric = metric
        self.temperature = float(temperature)
        self.input_key = input_key
        self.encoder: nn.Module | None = None
        self.episode_accuracies = episode_metrics(1)
        self.episode_settings: list[tuple[int, int]] = []
        if input_key is not None and input_shape is not None:
            self._build(tuple(input_shape))

    def _build(self, input_shape: tuple[int, ...]) -> None:
        hp = self.hparams
        self.hparams.update(input_shape=list(input_shape), input_key=self.input_key)
        from mneme.app.nn.log_mel import field_front_end

        image_only = {
            "model.encoder_pretrained": hp.encoder_pretrained,
            "model.encoder_input_size": hp.encoder_input_size,
        }
        # audio through the log-mel front end, as the aligner's audio tower
        front_end = field_front_end(
            self.input_key, input_shape, hp.encoder, hp.encoder_args, hp.encoder_weights, image_only
        )
        self.encoder = backbone_from_hparams(hp, input_shape) if front_end is None else front_end
        if hp.freeze_encoder:
            self.encoder.requires_grad_(False)
            freeze_norm_statistics(self.encoder)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self.input_key = self.input_key or datamodule.input_key
        shape = tuple(datamodule.field_shape(self.input_key))
        if self.encoder is None:
            self._build(shape)
        elif tuple(self.hparams.input_shape) != shape:
            raise ConfigError(
                f"model.input_shape: the network takes {self.input_key} samples of shape "
                f"{tuple(self.hparams.input_shape)}, the episodes' are {shape}; use a model "
                "(or checkpoint) made for this data"
            )
        self.episode_settings = eval_settings_of(datamodule)
        self.episode_accuracies = episode_metrics(len(self.episode_settings)).to(self.device)

    # -- the prototypical network ---------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def episode_logits(self, batch: Episodes) -> Tensor:
        """Query logits ``(T, N*Q, N)`` of every task against its support prototypes."""
        support, query = encode_episodes(self.embed, batch, self.input_key)
        n_way = n_way_of(batch)
        logits = []
        for s, y, q in zip(support, batch["support_label"], query, strict=True):
            prototypes, _ = class_means(s, y, n_way)
            logits.append(prototype_logits(q, prototypes, self.metric))
        logits = torch.stack(logits)
        return logits / self.temperature if self.metric == "cosine" else logits

    def episode_loss(self, batch: Episodes) -> tuple[Tensor, Tensor]:
        """The mean over tasks of each task's query cross-entropy, and the query accuracy."""
        logits = self.episode_logits(batch)
        labels = batch["query_label"].to(logits.device)
        per_task = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return per_task.mean(), accuracy

    def training_step(self, batch: Episodes, batch_idx: int) -> Tensor:
        loss, accuracy = self.episode_loss(batch)
        size = int(batch["query_label"].numel())
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/accuracy", accuracy, batch_size=size)
        return loss

    def validation_step(self, batch: Episodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.episode_logits(batch)
        correct = logits.argmax(-1) == batch["query_label"].to(logits.device)
        record_accuracies(self.episode_accuracies[dataloader_idx], correct, batch)

    test_step = validation_step

    def _reset_episodes(self) -> None:
        for metric in self.episode_accuracies:
            metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._reset_episodes()

    def on_test_epoch_start(self) -> None:
        self._reset_episodes()

    def configure_optimizers(self) -> torch.optim.Optimizer | list:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            self.automatic_optimization = False  # a frozen encoder: nothing to step
            return []
        try:
            return self.optimizer_factory(params)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.optimizer: {err}") from err
