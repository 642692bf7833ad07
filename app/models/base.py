"""What every Mneme LightningModule shares: the extension points strategies use, the
experience bookkeeping, and cheap logging."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from mneme.app.core.errors import ConfigError
from mneme.app.core.metrics import ExperienceAccuracy
from mneme.app.core.protocols import Batch, BatchTransform, LossTerm
from mneme.app.core.schedule import current_experience, is_experience_start
from mneme.app.finetuning.adaptation import freeze_norm_statistics
from mneme.app.finetuning.param_groups import apply_lr_scale
from mneme.app.models.run_definition import (
    KEY,
    VERSION,
    changed_settings,
    check_same_run,
    run_definition,
)
from mneme.app.nn.weight_files import leave_out_unchanged, refill_unchanged
from torch import Tensor, nn

# torch.compile's modes (torch/_inductor/list_mode_options); ``loss_terms`` is Mneme's own.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_KEYS = ("mode", "fullgraph", "dynamic", "backend", "options", "loss_terms")


def compile_options(value: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """``model.compile`` as torch.compile's keyword arguments plus ``loss_terms`` (compile
    the strategies' loss terms too; default true); ``None`` when off. ``true`` is
    ``{mode: default}``; a dict names any of :data:`COMPILE_KEYS`."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"model.compile: true, false or a dict of {list(COMPILE_KEYS)}, got {value!r}"
        )
    unknown = sorted(set(value) - set(COMPILE_KEYS))
    if unknown:
        raise ConfigError(f"model.compile: unknown key(s) {unknown}; use {list(COMPILE_KEYS)}")
    options = {"loss_terms": True, **value}
    if options.get("mode") is not None and options["mode"] not in COMPILE_MODES:
        raise ConfigError(
            f"model.compile.mode: one of {list(COMPILE_MODES)}, got {options['mode']!r}"
        )
    if options.get("mode") is not None and options.get("options") is not None:
        # torch.compile refuses both with a multi-line error deep in the first step
        raise ConfigError("model.compile: give mode or options, not both (torch.compile's rule)")
    return options


def prefer_fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer with ``fused=True`` when its class has a fused kernel (Adam, AdamW,
    SGD, Adagrad, ...), the config chose neither ``fused`` nor ``foreach``, and every
    parameter is a floating CUDA tensor: the whole update in a few kernel launches instead of
    several per op. Left as it is on a CPU: the CPU figures of benchmarks/RESULTS.md were
    measured with torch's default there."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or not all(p.is_cuda and p.is_floating_point() for p in params):
        return optimizer
    return rebuild_fused(optimizer)


def rebuild_fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` rebuilt with ``fused=True`` over the same groups (their own keys, e.g.
    ``lr_scale`` or ``weight_decay``, kept); itself when that does not apply."""
    defaults = optimizer.defaults
    if defaults.get("fused") is not None or defaults.get("foreach"):
        return optimizer  # chosen by the config
    arguments = inspect.signature(type(optimizer)).parameters
    if defaults.get("differentiable") or "fused" not in arguments or optimizer.state:
        return optimizer  # not fusable, or already stepped (its state is this instance's)
    # Groups hold every default (``fused: None`` too), so each group gets the flag; the
    # constructor takes only its own arguments (AdamW's defaults hold more).
    kwargs = {k: v for k, v in defaults.items() if k in arguments}
    groups = [{**group, "fused": True} for group in optimizer.param_groups]
    try:
        return type(optimizer)(groups, **{**kwargs, "fused": True})
    except (TypeError, RuntimeError, ValueError):  # a subclass with other arguments
        return optimizer


class ContinualModule(LightningModule):
    """Base of the continual modules: runs the strategies' extension points around every
    training step, keeps the experience bookkeeping, and logs cheaply.

    Extension points (callbacks register them in ``setup`` and remove them in
    ``teardown``, through :meth:`add_loss_term` / :meth:`add_batch_transform` and their
    ``remove_*``; see :class:`mneme.app.core.protocols.StrategyHost`). Every training step runs,
    in this order:

    1. the batch transforms, in registration order (the order of ``trainer.callbacks``):
       ``transform(batch, batch_idx) -> batch``, on the device (e.g. replay appends samples);
    2. the subclass's :meth:`training_terms` (its own loss terms and forward ``outputs``:
       ``logits``, ``features`` or ``embeddings``);
    3. the loss terms, in registration order: ``term(batch, outputs) -> scalar``, summed
       with the module's own and logged as ``train/loss_<name>``.

    ``training_step`` is this base's; a subclass implements ``training_terms`` instead, and
    defining ``training_step`` in a subclass is refused, so no module can skip a strategy.
    ``ContinualMetrics`` reads ``experience_accuracy``, which subclasses update in
    ``validation_step``/``test_step``; ``FiniteLossGuard`` reads ``last_loss_terms``.

    Subclasses implement ``observe_experience`` (called at every training epoch start with
    the running experience; it must be idempotent, so a resumed run is right) and build
    ``experience_accuracy`` in ``setup``.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "training_step" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__}: implement training_terms(batch) instead of training_step; "
                "ContinualModule.training_step runs the strategies' batch transforms and loss "
                "terms around it"
            )

    def __init__(
        self,
        optimizer: OptimizerCallable,
        reset_optimizer: bool,
        compile: bool | dict[str, Any] | None = False,
    ) -> None:
        super().__init__()
        # Not ``self.compile``: that is nn.Module.compile, which configure_model calls.
        self.compile_options = compile_options(compile)
        self._compiled = False
        self._compiled_terms: dict[str, tuple[LossTerm, Callable]] = {}
        self.optimizer_factory = optimizer
        self.reset_optimizer = reset_optimizer
        self.loss_terms: dict[str, LossTerm] = {}
        self.batch_transforms: dict[str, BatchTransform] = {}
        self.last_loss_terms: dict[str, Tensor] = {}
        self.experience_accuracy: ExperienceAccuracy | None = None
        self.idle = False  # nothing to train in this fit (see trains_nothing)

    # -- extension points -----------------------------------------------------------------
    def add_loss_term(self, name: str, term: LossTerm) -> str:
        """Register a named extra loss (logged as ``train/loss_<name>``); returns the name
        it got (``ewc_2`` for a second ``ewc``), which ``remove_loss_term`` takes."""
        name = _free_name(name, self.loss_terms)
        self.loss_terms[name] = term
        return name

    def remove_loss_term(self, name: str) -> None:
        self.loss_terms.pop(name, None)

    def add_batch_transform(self, name: str, transform: BatchTransform) -> str:
        """Register a transform of each training batch, applied before the forward pass;
        returns the name it got, which ``remove_batch_transform`` takes."""
        name = _free_name(name, self.batch_transforms)
        self.batch_transforms[name] = transform
        return name

    def remove_batch_transform(self, name: str) -> None:
        self.batch_transforms.pop(name, None)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if self.idle:  # nothing trains: no forward, no loss (manual optimization, no step)
            return None
        for transform in self.batch_transforms.values():
            batch = transform(batch, batch_idx)
        terms, outputs = self.training_terms(batch)
        return self.total_loss(terms, batch, outputs)

    def training_terms(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The module's own loss terms and its forward outputs on a (transformed) batch."""
        raise NotImplementedError

    # -- experiences ----------------------------------------------------------------------
    def observe_experience(self, classes: Sequence[int], tasks: Sequence[int]) -> None:
        """Record what the running experience brings: its classes and task labels."""

    def on_train_epoch_start(self) -> None:
        freeze_norm_statistics(self)  # after callbacks that (un)freeze layers at this epoch
        datamodule = self.trainer.datamodule
        k = current_experience(self.trainer)
        experience = datamodule.train_experiences[k]
        self.observe_experience(experience.classes, experience.tasks)
        if self.reset_optimizer and is_experience_start(self.trainer) and k > 0:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()  # Lightning keeps one optimizer for the whole fit

    # -- what defines the run ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Records what defines the run, and leaves out every pretrained backbone's tensors
        that are still its source's (:mod:`mneme.app.nn.weight_files`)."""
        if self._trainer is not None and self.trainer.datamodule is not None:
            checkpoint[KEY] = run_definition(self.trainer)
        leave_out_unchanged(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume that changes what defines the run is refused (see
        :mod:`.run_definition`); evaluating a checkpoint needs only the same stream."""
        refill_unchanged(self, checkpoint, "model.encoder_weights")
        saved = checkpoint.get(KEY)
        trainer = self._trainer
        if saved is None or trainer is None or trainer.datamodule is None:
            return  # written before runs were defined (mneme 0.1.0), or no stream to compare
        current = run_definition(trainer, int(saved.get("version", VERSION)))  # as it recorded
        allowed = set(getattr(trainer.datamodule, "allow_resume_changes", ()))
        if trainer.state.fn != "fit":
            allowed |= {"strategies", "epochs_per_experience", "optimizer"}
        check_same_run(saved, current, allowed)
        if trainer.state.fn == "fit" and "optimizer" in allowed:
            # accepted: applied once Lightning has restored the saved optimizer over it
            self._resumed_optimizer_settings = changed_settings(
                saved.get("optimizer") or {}, current.get("optimizer") or {}
            )

    def on_train_start(self) -> None:
        """An optimizer setting a resume changed (``data.allow_resume_changes: [optimizer]``)
        is applied to the restored optimizer, whose saved groups hold the old values."""
        settings = getattr(self, "_resumed_optimizer_settings", None) or {}
        settings = {k: v for k, v in settings.items() if k != "class"}
        for optimizer in self.trainer.optimizers if settings else ():
            for group in optimizer.param_groups:
                for key, value in settings.items():
                    scale = group.get("lr_scale", 1.0) if key == "lr" else 1.0
                    group[key] = value * scale if key == "lr" else value
        self._resumed_optimizer_settings = None

    def total_loss(self, terms: dict[str, Tensor], batch: Batch, outputs: dict) -> Tensor:
        """Sum the module's own loss ``terms`` and the registered ``loss_terms``; log them."""
        extra = {
            name: self._loss_term(name, term)(batch, outputs)
            for name, term in self.loss_terms.items()
        }
        terms = {**terms, **extra}
        loss = sum(terms.values())
        self.last_loss_terms = {name: value.detach() for name, value in terms.items()}
        if self.is_logging_step():
            logs = {f"train/loss_{name}": value for name, value in terms.items()}
            self.log_dict(logs, batch_size=len(batch["label"]))
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    # -- torch.compile ----------------------------------------------------------------------
    def compiled_modules(self) -> list[nn.Module]:
        """The submodules ``model.compile`` compiles (the encoders, where the FLOPs are)."""
        return []

    def configure_model(self) -> None:
        """``model.compile``: compile :meth:`compiled_modules` in place (``nn.Module.compile``,
        so parameter names, checkpoints and teachers' deep copies stay as without it). Runs
        after ``setup`` built the modules; once per module, however many fits run."""
        if self.compile_options is None or self._compiled:
            return
        options = {k: v for k, v in self.compile_options.items() if k != "loss_terms"}
        for module in self.compiled_modules():
            module.compile(**options)
        self._compiled = True

    def _loss_term(self, name: str, term: LossTerm) -> Callable:
        """``term``, compiled with ``model.compile``'s options when ``loss_terms`` is on (the
        strategies' terms, e.g. EWC's penalty over every parameter, then fuse into a few
        kernels). Cached per registered term: guards, not this cache, see new experiences."""
        options = self.compile_options
        if options is None or not options["loss_terms"]:
            return term
        cached = self._compiled_terms.get(name)
        if cached is None or cached[0] is not term:
            kwargs = {k: v for k, v in options.items() if k != "loss_terms"}
            cached = (term, torch.compile(term, **kwargs))
            self._compiled_terms[name] = cached
        return cached[1]

    def is_logging_step(self) -> bool:
        """Whether this step's values reach a logger. ``self.log`` costs about half a
        millisecond a call on a CPU (Lightning's result bookkeeping), as much as a small
        model's whole step, so values that would be dropped are not logged at all."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.trainer.global_step + 1) % every == 0

    def trains_nothing(self) -> bool:
        """Whether this fit has nothing to train (e.g. a prototype head on a frozen
        backbone). Then no optimizer is built and the training step does nothing: the fit
        only walks the stream, and the module does its work in its epoch hooks."""
        return False

    def configure_optimizers(self) -> torch.optim.Optimizer | list:
        self.idle = self.trains_nothing()
        if self.idle:
            # Manual optimization with no optimizer: Lightning then neither steps nor
            # expects a loss (automatic optimization refuses a skipped step under DDP);
            # an empty list is accepted without the warning ``None`` draws.
            self.automatic_optimization = False
            return []
        try:
            # groups may carry timm's per-layer ``lr_scale`` (layer-wise lr decay)
            optimizer = prefer_fused(self.optimizer_factory(self.optimizer_parameters()))
            return apply_lr_scale(optimizer)
        except (ValueError, TypeError) as err:  # e.g. torch's "Invalid learning rate: -1.0"
            raise ConfigError(f"model.optimizer: {err}") from err

    def optimizer_parameters(self):
        """The parameters that train (a frozen backbone's are left out)."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> ContinualModule:
        """Batch norms of frozen layers stay in eval mode, so their statistics stay the
        pretrained ones (see :func:`mneme.app.finetuning.adaptation.freeze_norm_statistics`)."""
        super().train(mode)
        if mode:
            freeze_norm_statistics(self)
        return self


def _free_name(name: str, taken: dict) -> str:
    """``name``, or ``name_2``, ``name_3``, ... when another callback has it."""
    n, free = 1, name
    while free in taken:
        n += 1
        free = f"{name}_{n}"
    return free
