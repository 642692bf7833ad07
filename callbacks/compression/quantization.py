"""Int8 quantization of a continual model, and its accuracy matrix next to the float one."""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from mneme.app.compress.quantize import (
    MODES,
    check_quantizable,
    convert_qat,
    detach_pruned_weights,
    float_layers,
    is_qat_prepared,
    prepare_qat,
    quantize_model,
    tower_exclude,
)
from mneme.app.core.errors import ConfigError
from mneme.app.core.metrics import summarize
from mneme.app.core.private_api import shell_with_copied_children
from mneme.app.core.protocols import ZeroShotClassifier, require
from mneme.app.nn.retrieval import CrossModalRecall
from mneme.callbacks.base import ExperienceCallback
from torch import nn

STATE_VERSION = 2  # 2: aligner retrieval rows


class Quantization(ExperienceCallback):
    """Int8 quantization (torchao, :mod:`mneme.app.compress.quantize`) of the module's ``nn.Linear``
    layers: after each experience a quantized *copy* of the module is evaluated on every
    test experience, next to the float model, so the accuracy cost of quantization per
    experience is visible; ``qat`` also trains with fake quantization.

    - ``ptq_dynamic`` / ``ptq_weight_only`` / ``ptq_static``: post-training; the float model
      trains untouched (``ptq_static`` calibrates on ``calibration_batches`` training batches
      of the experience just finished).
    - ``qat``: fake quantization inserted in ``on_fit_start`` (``prepare``), so every experience
      trains through it; the copy evaluated is converted to int8 kernels, and with
      ``convert_at_end`` the module itself is converted at the end of ``fit``.

    Writes ``<log_dir>/quantized_metrics.json`` (``float`` and ``quantized`` accuracy
    matrices with their summaries, by :func:`mneme.app.core.metrics.summarize`) and logs
    ``quantized/acc_exp<j>``, ``quantized/average_accuracy``, ``float/average_accuracy`` (step
    = experience). Each rank evaluates the full test experiences (the copy is not wrapped by
    DDP), so every rank holds the same matrix; rank 0 writes it.

    A :class:`~mneme.app.ContrastiveAligner` quantizes per tower: ``encoders`` names the
    towers made int8 (default all; the others stay float). Its accuracy matrix is the
    zero-shot one (the quantized towers embed the images and the class prompts), and each
    evaluation also records Recall@1 of every pair in both directions over the whole test
    stream, float next to int8 (``retrieval`` in the JSON, ``quantized/recall@1_<a>_to_<b>``).

    What torchao's CPU int8 path cannot quantize stays float and is named once at fit start
    (convolutions, embeddings, ``nn.MultiheadAttention``'s packed in-projection and its
    ``out_proj``, whose weight torch reads directly); a selection with no ``nn.Linear`` left to
    quantize is refused naming its layer types.

    Args:
        mode: ``ptq_dynamic``, ``ptq_weight_only``, ``ptq_static`` or ``qat``.
        exclude: names (prefixes) of submodules left in float, e.g. ``[head]``.
        encoders: an aligner's towers to quantize, e.g. ``[image]``; default all of them.
        calibration_batches: batches of training data for ``ptq_static``.
        every_experience: evaluate after each experience (``False``: at the end of fit only).
        convert_at_end: ``qat``: convert the module to int8 at the end of ``fit``.
        batch_size: evaluation batch size; default the datamodule's.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.Quantization
              init_args: {mode: qat}
            # an aligner: int8 image tower, float text tower
            # - class_path: mneme.callbacks.Quantization
            #   init_args: {mode: ptq_dynamic, encoders: [image]}
    """

    def __init__(
        self,
        mode: Literal["ptq_dynamic", "ptq_weight_only", "ptq_static", "qat"] = "ptq_dynamic",
        exclude: list[str] | None = None,
        encoders: list[str] | None = None,
        calibration_batches: int = 8,
        every_experience: bool = True,
        convert_at_end: bool = True,
        batch_size: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"Quantization.mode: one of {MODES}, got '{mode}'")
        if calibration_batches < 1:
            raise ConfigError(
                f"Quantization.calibration_batches: must be at least 1, got {calibration_batches}"
            )
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"Quantization.batch_size: must be at least 1, got {batch_size}")
        self.mode = mode
        self.exclude = list(exclude or [])
        self.encoders = None if encoders is None else list(encoders)
        self._exclude = list(self.exclude)  # plus the towers left float (on_fit_start)
        self.calibration_batches = calibration_batches
        self.every_experience = every_experience
        self.convert_at_end = convert_at_end
        self.batch_size = batch_size
        self.float_rows: list[list[float]] = []
        self.quantized_rows: list[list[float]] = []
        self.experiences: list[int] = []
        self.retrieval: list[dict[str, dict[str, float]]] = []  # aligner: per evaluation

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, ZeroShotClassifier, "Quantization")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The module has built its layers in its own `setup` (after this callback's). The
        # fake quantizers keep each Linear's Parameters and state_dict keys, so the optimizer
        # (already built) and a restored checkpoint's weights stay as they are.
        self._exclude = self.exclude + tower_exclude(
            pl_module, self.encoders, "Quantization.encoders"
        )
        for name in self.encoders or []:
            check_quantizable(pl_module.encoders[name], "encoders", self._exclude_in(name))
        check_quantizable(pl_module, exclude=self._exclude)
        left = float_layers(pl_module, self._exclude)
        if left:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(left.items()))
            rank_zero_info(
                f"Quantization: left float (torchao's CPU int8 path swaps nn.Linear only): {kinds}"
            )
        if self.mode == "qat" and not is_qat_prepared(pl_module):
            prepare_qat(pl_module, self._exclude)

    def _exclude_in(self, tower: str) -> list[str]:
        # The user's exclude prefixes relative to one tower (``encoders.image.x`` -> ``x``).
        prefix = f"encoders.{tower}."
        return [e.removeprefix(prefix) for e in self.exclude if e.startswith(prefix)]

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        last = experience == trainer.datamodule.num_experiences - 1
        if experience in self.experiences or not (self.every_experience or last):
            return
        self.evaluate(trainer, pl_module, experience)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "qat" and self.convert_at_end and is_qat_prepared(pl_module):
            pl_module.eval()
            convert_qat(pl_module, self._exclude)

    # -- evaluation -----------------------------------------------------------------------
    def quantized_copy(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        """The module's int8 copy: a shallow copy of the module (its trainer, hooks and
        registered extension points shared, never called) whose submodules are deep copies,
        quantized in place; the module itself is untouched."""
        # Deep copies of the submodules, pruning masks and all (made permanent in the copy).
        detach_pruned_weights(pl_module)
        shell = shell_with_copied_children(pl_module, copy.deepcopy)
        calibration = None
        if self.mode == "ptq_static":
            calibration = self._calibration(trainer, pl_module, experience)
        shell.eval()
        model = quantize_model(
            shell,
            self.mode,
            calibration=calibration,
            run=_calibration_run(pl_module),
            exclude=self._exclude,
            inplace=True,
        )
        return model.eval()

    def _calibration(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        data = trainer.datamodule.train_experiences[experience]
        out = []
        for i, batch in enumerate(data.batches(self._batch_size(trainer))):
            if i >= self.calibration_batches:
                break
            out.append({k: v.to(pl_module.device) for k, v in batch.items()})
        return out

    def _batch_size(self, trainer: Trainer) -> int:
        return self.batch_size or getattr(trainer.datamodule, "batch_size", 256)

    @torch.no_grad()
    def accuracies(self, trainer: Trainer, model: nn.Module, device: torch.device) -> list[float]:
        """Accuracy of ``model`` on every test experience."""
        out = []
        for data in trainer.datamodule.test_experiences:
            correct = total = 0
            for batch in data.batches(self._batch_size(trainer)):
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(batch[model.input_key], batch.get("task"))
                correct += int((logits.argmax(-1) == batch["label"]).sum())
                total += len(batch["label"])
            out.append(correct / max(total, 1))
        return out

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, experience: int) -> None:
        """Evaluate float and int8 on every test experience; record, log and write the rows."""
        was_training = pl_module.training
        quantized = self.quantized_copy(trainer, pl_module, experience)
        pl_module.eval()
        try:
            self.float_rows.append(self.accuracies(trainer, pl_module, pl_module.device))
            self.quantized_rows.append(self.accuracies(trainer, quantized, pl_module.device))
            if _is_aligner(pl_module):
                self.retrieval.append(
                    {
                        "float": self.recall(trainer, pl_module, pl_module.device),
                        "quantized": self.recall(trainer, quantized, pl_module.device),
                    }
                )
        finally:
            pl_module.train(was_training)
        self.experiences.append(experience)
        summary = self.summary()
        metrics = {f"quantized/acc_exp{j}": a for j, a in enumerate(self.quantized_rows[-1])}
        metrics["quantized/average_accuracy"] = summary["quantized"]["average_accuracy"]
        metrics["float/average_accuracy"] = summary["float"]["average_accuracy"]
        if self.retrieval:
            for kind in ("float", "quantized"):
                for name, value in self.retrieval[-1][kind].items():
                    metrics[f"{kind}/{name}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=experience)
        self._write(trainer, summary)

    @torch.no_grad()
    def recall(self, trainer: Trainer, model: nn.Module, device: torch.device) -> dict[str, float]:
        """An aligner's Recall@1 of every pair, both directions, over the whole test stream
        (the gallery is every test sample; same-class hits count with ``recall_by_label``)."""
        by_label = bool(model.hparams.get("recall_by_label", False))
        metrics = {
            pair: CrossModalRecall((1,), by_label=by_label).to(device) for pair in model.pairs
        }
        for data in trainer.datamodule.test_experiences:
            for batch in data.batches(self._batch_size(trainer)):
                batch = {k: v.to(device) for k, v in batch.items()}
                emb = model.embed(batch, list(dict.fromkeys(m for p in model.pairs for m in p)))
                for (a, b), metric in metrics.items():
                    metric.update(emb[a], emb[b], batch["label"])
        out = {}
        for (a, b), metric in metrics.items():
            forward, backward = metric.compute()[:, 0].tolist()
            out[f"recall@1_{a}_to_{b}"] = forward
            out[f"recall@1_{b}_to_{a}"] = backward
        return out

    def summary(self) -> dict[str, Any]:
        out = {
            "mode": self.mode,
            "experiences": list(self.experiences),
            "float": {"rows": self.float_rows, **_summary(self.float_rows)},
            "quantized": {"rows": self.quantized_rows, **_summary(self.quantized_rows)},
        }
        if self.encoders is not None:
            out["encoders"] = list(self.encoders)
        if self.retrieval:
            out["retrieval"] = self.retrieval
        return out

    def report_lines(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        """The int8 copy's accuracy matrix, printed under the float one
        (``ContinualMetrics``; the ``quantized`` part of quantized_metrics.json)."""
        from mneme.callbacks.reporting.accuracy_tables import format_matrix

        title = f"Int8 accuracy matrix ({self.mode}; row: after training experience k)"
        summary = _summary(self.quantized_rows)
        return format_matrix(title, self.quantized_rows, self.experiences, summary)

    @rank_zero_only
    def _write(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        log_dir = trainer.log_dir
        if log_dir is None:
            return
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "quantized_metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)

    # -- state ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "experiences": list(self.experiences),
            "float_rows": [list(r) for r in self.float_rows],
            "quantized_rows": [list(r) for r in self.quantized_rows],
            "retrieval": [dict(r) for r in self.retrieval],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["mode"] != self.mode:
            raise ConfigError(
                f"Quantization.mode: the checkpoint is mode '{state_dict['mode']}', "
                f"not '{self.mode}'; resume with the same mode"
            )
        self.experiences = list(state_dict["experiences"])
        self.float_rows = [list(r) for r in state_dict["float_rows"]]
        self.quantized_rows = [list(r) for r in state_dict["quantized_rows"]]
        self.retrieval = [dict(r) for r in state_dict.get("retrieval", [])]  # version 1 lacks it


def _is_aligner(module: nn.Module) -> bool:
    return isinstance(getattr(module, "encoders", None), nn.ModuleDict) and hasattr(module, "pairs")


def _calibration_run(pl_module: nn.Module):
    """How ``ptq_static`` runs a calibration batch: the zero-shot forward (a classifier's
    logits; an aligner's query tower and the class prompts) and, for an aligner, every
    tower on the batch's own modalities (the text tower on captions too)."""
    aligner = _is_aligner(pl_module)

    def run(model: nn.Module, batch: dict[str, Any]) -> None:
        model(batch[pl_module.input_key], batch.get("task"))
        if aligner:
            model.embed(batch)

    return run


def _summary(rows: list[list[float]]) -> dict[str, Any]:
    if not rows:
        return {}
    # A matrix over the experiences evaluated (all of them unless every_experience=False).
    square = rows if len(rows) == len(rows[0]) else None
    if square is None:
        return {"average_accuracy": sum(rows[-1]) / len(rows[-1])}
    return {k: v for k, v in summarize(square, None).items() if not isinstance(v, list)}
