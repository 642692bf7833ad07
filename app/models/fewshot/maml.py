"""Gradient-based meta-learning over a distribution of few-shot tasks: MAML (second order),
first-order MAML and Reptile, on any Mneme encoder.

The functional inner loop (fast weights on :func:`torch.func.functional_call`, why no
meta-learning library) lives in :mod:`mneme.app.models.fewshot.maml_inner_loop`.

One meta-training step, on a meta-batch of ``T`` tasks (the batch contract of
:class:`mneme.datamodules.fewshot.episodes.EpisodicDataModule`: ``support``/``query`` dicts of
``(T, N*K, ...)`` / ``(T, N*Q, ...)`` tensors, ``support_label``/``query_label`` episode-local
labels, ``classes`` the tasks' global class ids):

1. every task starts from the meta-parameters ``theta`` and takes ``inner_steps`` SGD steps of
   ``inner_lr`` on its support set: ``phi <- phi - inner_lr * grad L_support(phi)``;
2. ``maml``: the meta-gradient of the task is ``d L_query(phi(theta)) / d theta`` through the
   whole unroll (second order); ``fomaml``: the same with the inner gradients treated as
   constants, i.e. ``grad L_query(phi)`` evaluated at ``phi``; ``reptile``: the pseudo-gradient
   ``theta - phi`` (the query set is only scored);
3. the task's meta-gradient is added to a running sum right away and its graph freed, so a
   meta-batch costs the memory of one task (gradient accumulation across tasks);
4. the sums are averaged over the tasks of the meta-batch: the **mean over all tasks of all
   processes** (under DDP the sums and the task counts are all-reduced, then divided, so
   ranks with unequal task counts still give the global mean), written to ``.grad`` and the
   outer ``optimizer`` steps. Reptile with ``SGD(lr=eps)`` is thus
   ``theta + eps * mean_t(phi_t - theta)``; any other optimizer (Adam) acts on that
   pseudo-gradient.

DDP: the inner loop runs :func:`functional_call` on the plain module, not through
``DistributedDataParallel``'s forward, and the meta-gradients are taken with
:func:`torch.autograd.grad` (no ``.backward()``), so DDP's reducer never fires (Lightning
disarms it for manual optimization anyway). The one all-reduce of the meta-gradients is
:meth:`MetaLearner._set_meta_gradients`. The episodic datamodule shards tasks across ranks.
Batch-norm running statistics are updated by each rank on its own tasks and not synced
(they are unused with the default transductive batch norm, see
:mod:`~mneme.app.models.fewshot.maml_inner_loop`).

Mixed precision: Lightning runs ``training_step``/``validation_step`` inside the precision
plugin's autocast, so the inner and outer forward passes run in ``bf16``/``fp16`` where it
applies (``bf16-mixed`` on CPUs too) while parameters, fast weights and meta-gradients stay
``float32``. With ``16-mixed`` the query loss (MAML, FOMAML) or the pseudo-gradient (Reptile)
is multiplied by Lightning's ``GradScaler``, which unscales and skips steps with inf
gradients as usual; the inner-loop gradients are not loss-scaled (no scaler exists for
them), so ``bf16-mixed`` is the better choice for deep unrolls.

Evaluation with gradients: Lightning evaluates under ``torch.inference_mode()``; adaptation
needs autograd, so each validation/test episode runs inside ``torch.inference_mode(False)``
and ``torch.enable_grad()``, on clones of the inputs (tensors made in inference mode cannot
take part in autograd). Any ``Trainer(inference_mode=...)`` works.

Per-episode query accuracies are kept in :attr:`MetaLearner.episode_accuracies`, one
``torchmetrics.CatMetric`` per eval setting (``dataloader_idx``), reset at each validation /
test epoch start and synced across ranks; their mean is logged as
``val/accuracy_<N>way_<K>shot`` / ``test/...``. Episodes flagged ``padded`` (repeats that
even out DDP ranks) are left out.

Example (YAML)::

    model:
      class_path: mneme.app.MetaLearner
      init_args:
        encoder: mneme_cnn
        algorithm: maml
        inner_steps: 5
        inner_lr: 0.4
        eval_inner_steps: 10
        optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from mneme.app.core.errors import ConfigError
from mneme.app.models.fewshot.maml_inner_loop import (
    Weights,
    batch_statistics_norm,
    detach_weights,
    episode_tensors,
    float32_logits,
    functional_logits,
    inner_loop,
    non_finite_loss_error,
    weight_leaves,
    zero_head_start,
)
from mneme.app.nn.backbones import create_backbone
from mneme.app.nn.encoders import feature_dim
from torch import Tensor, nn
from torchmetrics import CatMetric

ALGORITHMS = ("maml", "fomaml", "reptile")
HEAD_INITS = ("learned", "zero")


class MetaLearner(LightningModule):
    """MAML, first-order MAML and Reptile on an encoder (timm, by name) and an ``n_way`` head.

    Args:
        encoder: a timm model name (``mneme_cnn``, ``mneme_mlp``, ``resnet18``, ...).
        encoder_args: keyword arguments of the timm model (``widths: [32, 32]``).
        encoder_weights: a local weights file for the encoder (see
            :mod:`mneme.app.nn.backbones`), the meta-learning's starting point.
        algorithm: ``maml`` (second order), ``fomaml`` (first order) or ``reptile``.
        inner_steps: SGD steps on each task's support set during meta-training.
        inner_lr: the inner loop's learning rate.
        eval_inner_steps: inner steps at validation/test (default ``inner_steps``; MAML
            papers use more at test time).
        n_way: classes per task (default: the datamodule's ``n_way``).
        head_init: ``learned`` (MAML: the head's initialization is meta-learned) or ``zero``
            (the "zero trick" of Kao et al. 2022 / unicorn-MAML: every task's head starts at
            zero and only the encoder is meta-learned; tasks of any ``N`` can then be
            evaluated).
        transductive_batch_norm: batch norm uses each set's batch statistics at evaluation
            too (MAML's convention); ``false``: the running statistics.
        optimizer: the outer (meta) optimizer; Reptile applies it to ``theta - phi``.
        input_key: the field of ``batch["support"]``/``batch["query"]`` the encoder reads.
        input_shape: the samples' shape (read from the datamodule when not given).
    """

    def __init__(
        self,
        encoder: str = "mneme_cnn",
        encoder_args: dict[str, Any] | None = None,
        encoder_weights: str | None = None,
        algorithm: Literal["maml", "fomaml", "reptile"] = "maml",
        inner_steps: int = 5,
        inner_lr: float = 0.4,
        eval_inner_steps: int | None = None,
        n_way: int | None = None,
        head_init: Literal["learned", "zero"] = "learned",
        transductive_batch_norm: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        input_key: str = "image",
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"model.algorithm: one of {ALGORITHMS}, got {algorithm!r}")
        if head_init not in HEAD_INITS:
            raise ConfigError(f"model.head_init: one of {HEAD_INITS}, got {head_init!r}")
        if not (isinstance(inner_steps, int) and inner_steps >= 1):
            raise ConfigError(f"model.inner_steps: at least 1, got {inner_steps!r}")
        if eval_inner_steps is not None and not (
            isinstance(eval_inner_steps, int) and eval_inner_steps >= 0
        ):
            raise ConfigError(f"model.eval_inner_steps: 0 or more, got {eval_inner_steps!r}")
        if not (math.isfinite(inner_lr) and inner_lr > 0):
            raise ConfigError(f"model.inner_lr: a positive number, got {inner_lr!r}")
        if n_way is not None and n_way < 2:
            raise ConfigError(f"model.n_way: at least 2, got {n_way!r}")
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.algorithm = algorithm
        self.inner_steps = inner_steps
        self.inner_lr = float(inner_lr)
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.input_key = input_key
        self.encoder: nn.Module | None = None
        self.head: nn.Linear | None = None
        self.episode_accuracies = nn.ModuleList()
        self._episode_names: dict[int, str] = {}
        if n_way is not None and input_shape is not None:
            self._build(tuple(input_shape), n_way)

    # -- building -------------------------------------------------------------------------
    def _build(self, input_shape: tuple[int, ...], n_way: int) -> None:
        hp = self.hparams
        self.hparams.update(input_shape=input_shape, n_way=n_way)
        self.n_way = n_way
        from mneme.app.nn.log_mel import field_front_end

        # audio through the log-mel front end, as the aligner's audio tower
        front_end = field_front_end(
            self.input_key, input_shape, hp.encoder, hp.encoder_args, hp.encoder_weights
        )
        if front_end is None:
            front_end = create_backbone(
                hp.encoder, input_shape, args=hp.encoder_args, weights=hp.encoder_weights
            )
        self.encoder = front_end
        self.width = feature_dim(self.encoder, input_shape)
        if hp.head_init == "learned":
            self.head = nn.Linear(self.width, n_way)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if self.encoder is None:
            if datamodule is None:
                raise ConfigError(
                    "model.input_shape: give model.n_way and model.input_shape, or a datamodule"
                )
            n_way = self.hparams.n_way or datamodule.n_way
            self._build(tuple(datamodule.field_shape(self.input_key)), n_way)
        settings = list(getattr(datamodule, "eval_settings", None) or [])
        if self.head is not None:
            for n, k in settings:
                if n != self.n_way:
                    raise ConfigError(
                        f"data.eval_settings: [{n}, {k}] has {n} classes but the meta-learned "
                        f"head has n_way {self.n_way}; evaluate {self.n_way}-way tasks, or set "
                        "model.head_init: zero"
                    )
        self._episode_names = {i: f"{n}way_{k}shot" for i, (n, k) in enumerate(settings)}
        self.episode_accuracies = nn.ModuleList(CatMetric() for _ in range(max(len(settings), 1)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        try:
            return self.optimizer_factory(self.parameters())
        except (ValueError, TypeError) as err:  # e.g. torch's "Invalid learning rate: -1.0"
            raise ConfigError(f"model.optimizer: {err}") from err

    # -- the functional model -------------------------------------------------------------
    def meta_parameters(self) -> Weights:
        """The meta-learned weights ``theta`` (the module's own Parameters)."""
        head = dict(self.head.named_parameters()) if self.head is not None else {}
        return {"encoder": dict(self.encoder.named_parameters()), "head": head}

    def _start(self, theta: Weights, n_way: int) -> Weights:
        """A task's initial fast weights: ``theta``, with a zero head under ``head_init: zero``."""
        if self.head is not None:
            return theta
        return zero_head_start(theta, n_way, self.width)

    def logits(self, weights: Weights, buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_logits(self.encoder, weights, buffers, x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the meta-learned initialization (before any adaptation)."""
        return self.head(self.encoder(x))

    def adapt(
        self,
        theta: Weights,
        buffers: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        steps: int,
        second_order: bool,
        n_way: int,
    ) -> tuple[Weights, list[Tensor]]:
        """:func:`~mneme.app.models.fewshot.maml_inner_loop.inner_loop` on this module's
        encoder and ``inner_lr``, from ``theta`` (with a zero ``n_way`` head under
        ``head_init: zero``): the fast weights and the support loss before each step."""
        start = self._start(theta, n_way)
        return inner_loop(self.encoder, start, buffers, x, y, steps, self.inner_lr, second_order)

    # -- meta-training --------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        support, s_label, query, q_label = episode_tensors(batch, self.input_key)
        tasks, n_way = s_label.shape[0], self._n_way(batch)
        theta = self.meta_parameters()
        leaves = weight_leaves(theta)
        sums = [torch.zeros_like(p) for p in leaves]
        buffers = dict(self.encoder.named_buffers())
        inner_losses, query_losses, correct = [], [], []
        second_order = self.algorithm == "maml"
        for t in range(tasks):
            if self.algorithm == "reptile":
                with torch.no_grad():
                    fast, losses = self.adapt(
                        detach_weights(theta), buffers, support[t], s_label[t], self.inner_steps,
                        False, n_way,
                    )  # fmt: skip
                    logits = float32_logits(self.logits(fast, buffers, query[t]))
                    loss = F.cross_entropy(logits, q_label[t])
                    # theta - phi over the meta-learned weights (a zero head is not one)
                    shift = [theta[part][k] - fast[part][k] for part in theta for k in theta[part]]
                    task_grads = [self._scale(g) for g in shift]
            else:
                fast, losses = self.adapt(
                    theta, buffers, support[t], s_label[t], self.inner_steps, second_order, n_way
                )
                logits = float32_logits(self.logits(fast, buffers, query[t]))
                loss = F.cross_entropy(logits, q_label[t])
                task_grads = torch.autograd.grad(self._scale(loss), leaves, allow_unused=True)
            for total, g in zip(sums, task_grads, strict=True):
                if g is not None:
                    total.add_(g)
            inner_losses.append(torch.stack(losses))
            query_losses.append(loss.detach())
            correct.append((logits.detach().argmax(-1) == q_label[t]).float().mean())
        inner, queries = torch.stack(inner_losses), torch.stack(query_losses)
        self._set_meta_gradients(leaves, sums, tasks, inner, queries)
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        meta_loss = queries.mean()
        self.log("train/meta_loss", meta_loss, prog_bar=True, batch_size=tasks)
        self.log("train/query_accuracy", torch.stack(correct).mean(), batch_size=tasks)
        return meta_loss

    def _scale(self, value: Tensor) -> Tensor:
        """``value`` times the loss scale of ``16-mixed`` (Lightning's GradScaler)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler.scale(value) if scaler is not None else value

    def _set_meta_gradients(
        self, leaves: list[Tensor], sums: list[Tensor], tasks: int, inner: Tensor, query: Tensor
    ) -> None:
        """The meta-gradients, averaged over every task of every process, into ``.grad``.

        The one place that communicates: the per-process sums, the task count and a
        "non-finite loss" flag travel in one flat all-reduce (a sum); each process then
        divides by the global task count, so all processes step with the same gradient,
        which equals a single process's on the union of the tasks. A non-finite inner loss
        is raised on every process at once (no process is left waiting in a collective).
        """
        losses = torch.cat([inner, query[:, None]], dim=1)  # (tasks, inner_steps + 1)
        dtype = sums[0].dtype
        bad = (~torch.isfinite(losses)).any().to(dtype)
        count = torch.tensor(float(tasks), dtype=dtype, device=bad.device)
        flat = torch.cat([torch.cat([s.flatten() for s in sums]), count[None], bad[None]])
        if self.trainer.world_size > 1:
            flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        if flat[-1].item() > 0:
            trainer = self.trainer  # one line naming the field and the fix
            raise non_finite_loss_error(
                losses, self.inner_lr, trainer.global_rank, trainer.world_size
            )
        total, offset = flat[-2], 0
        for p in leaves:
            n = p.numel()
            p.grad = (flat[offset : offset + n] / total).view_as(p).to(p.dtype)
            offset += n

    # -- evaluation -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._reset_episodes()

    def on_test_epoch_start(self) -> None:
        self._reset_episodes()

    def _reset_episodes(self) -> None:
        for metric in self.episode_accuracies:
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        accuracies = self.evaluate_episodes(batch)
        while dataloader_idx >= len(self.episode_accuracies):  # more loaders than settings
            self.episode_accuracies.append(CatMetric().to(self.device))
        if dataloader_idx not in self._episode_names:
            n = self._n_way(batch)
            self._episode_names[dataloader_idx] = (
                f"{n}way_{batch['support_label'].shape[1] // n}shot"
            )
        padded = batch.get("padded")  # evaluation episodes repeated to even out DDP ranks
        if padded is not None:
            accuracies = accuracies[~padded.to(accuracies.device).bool()]
        self.episode_accuracies[dataloader_idx].update(accuracies)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_episodes("val")

    def on_test_epoch_end(self) -> None:
        self._log_episodes("test")

    def _log_episodes(self, stage: str) -> None:
        for i, metric in enumerate(self.episode_accuracies):
            if i not in self._episode_names or not metric.update_called:
                continue
            accuracy = metric.compute().float().mean()
            name = f"{stage}/accuracy_{self._episode_names[i]}"
            self.log(name, accuracy, sync_dist=True, add_dataloader_idx=False)

    def evaluate_episodes(self, batch: dict) -> Tensor:
        """Query accuracy of each episode of ``batch`` after ``eval_inner_steps`` steps on its
        support set: a ``(T,)`` tensor. Runs with autograd on whatever mode Lightning
        evaluates in (see the module docstring)."""
        n_way = self._n_way(batch)
        if self.head is not None and n_way != self.n_way:
            raise ConfigError(
                f"data.eval_settings: a {n_way}-way episode meets a head of n_way "
                f"{self.n_way}; evaluate {self.n_way}-way tasks, or set model.head_init: zero"
            )
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            batch_statistics_norm(self.encoder, self.hparams.transductive_batch_norm),
        ):
            support, s_label, query, q_label = (
                v.clone() for v in episode_tensors(batch, self.input_key)
            )
            buffers = {k: b.clone() for k, b in self.encoder.named_buffers()}
            theta = detach_weights(self.meta_parameters())
            accuracies = []
            for t in range(s_label.shape[0]):
                fast, _ = self.adapt(
                    theta, buffers, support[t], s_label[t], self.eval_inner_steps, False, n_way
                )
                with torch.no_grad():
                    logits = self.logits(fast, buffers, query[t])
                accuracies.append((logits.argmax(-1) == q_label[t]).float().mean())
            return torch.stack(accuracies).detach()

    def _n_way(self, batch: dict) -> int:
        classes = batch.get("classes")
        return int(classes.shape[1]) if classes is not None else self.n_way
