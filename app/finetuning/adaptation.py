"""Parameter-efficient fine-tuning of a backbone, as configuration.

``peft`` in a model's config (``model.init_args.peft`` of the classifier, ``peft`` of an
aligner tower) names the method and its arguments; the backbone is frozen and only what the
method adds (plus the head) trains::

    peft:
      method: lora                 # lora, loha, lokr, ia3 (Hugging Face peft); adapter,
      r: 4                         #   bitfit, prompt (mneme)
      lora_alpha: 8                # every other key is an argument of the method: peft's own
      lora_dropout: 0.0            #   names (LoraConfig, LoHaConfig, ...), or those of
      target_modules: 'blocks\\.\\d+\\.\\d+\\.conv_pwl?'   #   add_bottleneck_adapters /
      adapters: shared             # shared | per_task      add_visual_prompts
      merge_each_experience: false

Why the model and not a callback: PEFT changes which parameters the model has, so it must be
part of what builds the model. A checkpoint loaded without callbacks (``mneme test``,
``load_from_checkpoint``) then rebuilds the same parameters from the hyperparameters.

Stream options:

- ``adapters: shared``: one adapter for the whole stream.
- ``adapters: per_task``: one adapter per task label (task-incremental streams); each sample
  runs through its task's adapter.
- ``merge_each_experience: true`` (LoRA): at each experience end the adapter is folded into
  the backbone's weights and a fresh one starts, so every experience adds a low-rank update.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.app.core.library_errors import peft_target_modules_missing
from torch import Tensor, nn

FIELD = "model.peft"
PEFT_METHODS = ("lora", "loha", "lokr", "ia3")  # Hugging Face peft, on plain torch modules
MNEME_METHODS = ("adapter", "bitfit", "prompt")  # what peft lacks for timm models
ADAPTER_MODES = ("shared", "per_task")
SHARED = "default"


def _peft_config_class(method: str) -> type:
    import peft

    return {
        "lora": peft.LoraConfig,
        "loha": peft.LoHaConfig,
        "lokr": peft.LoKrConfig,
        "ia3": peft.IA3Config,
    }[method]


def _peft_tuner_class(method: str) -> type:
    """peft's tuner of ``method``: what ``peft.inject_adapter_in_model`` builds (and then
    drops); kept here, its ``merge_and_unload`` folds the adapters into the backbone."""
    import peft

    return {
        "lora": peft.LoraModel,
        "loha": peft.LoHaModel,
        "lokr": peft.LoKrModel,
        "ia3": peft.IA3Model,
    }[method]


class BackboneAdaptation:
    """Freezes ``backbone`` and adds the trainable parameters of a PEFT method to it, in
    place (the backbone keeps its class, so its ``group_matcher`` and names stay timm's).

    ``run(x, task)`` is the backbone's forward with each sample's adapter active;
    ``end_experience()`` folds a LoRA update into the weights when the spec asks (then
    ``merged``). ``unchanged_tensors()`` names what still equals the backbone's source: a
    checkpoint need not hold it.

    Args:
        backbone: the model to adapt.
        spec: the ``peft`` config (``None``: no PEFT).
        freeze: freeze the backbone's own weights; ``None`` freezes them when ``spec`` is
            given. A frozen backbone trains nothing of its own.
        num_tasks: the stream's task labels (``adapters: per_task`` makes one each).
        input_shape: one sample's shape (bottleneck adapters measure their widths with it).
        field: the config field named in errors.
    """

    def __init__(
        self,
        backbone: nn.Module,
        spec: dict[str, Any] | None,
        freeze: bool | None = None,
        num_tasks: int = 1,
        input_shape: Sequence[int] | None = None,
        field: str = FIELD,
    ) -> None:
        self.backbone = backbone
        backbone.adaptation = self  # a plain attribute: checkpoints find it with the backbone
        self.input_shape = tuple(input_shape) if input_shape else None
        self.field = field
        spec = dict(spec or {})
        self.method = spec.pop("method", None)
        self.mode = spec.pop("adapters", "shared")
        self.merge_each_experience = bool(spec.pop("merge_each_experience", False))
        self.frozen = bool(spec or self.method) if freeze is None else bool(freeze)
        if self.method is None and (spec or self.mode != "shared" or self.merge_each_experience):
            raise ConfigError(f"{field}.method: one of {PEFT_METHODS + MNEME_METHODS}")
        if self.method is not None and not self.frozen:
            raise ConfigError(
                f"{field}: PEFT trains only what the method adds; drop freeze: false "
                "(full fine-tuning is the model without peft)"
            )
        self._check_options()
        self.adapter_names = [SHARED]
        self.tuner: Any = None  # peft's tuner of a peft method (its merge_and_unload)
        if self.frozen:
            backbone.requires_grad_(False)
        self.added: list[nn.Parameter] = []
        if self.method is not None:
            self._apply(spec, num_tasks)
        self.merged = False

    def _check_options(self) -> None:
        if self.method is not None and self.method not in PEFT_METHODS + MNEME_METHODS:
            close = difflib.get_close_matches(str(self.method), PEFT_METHODS + MNEME_METHODS)
            raise ConfigError(
                f"{self.field}.method: unknown method {self.method!r}"
                f"{' (did you mean ' + close[0] + '?)' if close else ''}; one of "
                f"{', '.join(PEFT_METHODS + MNEME_METHODS)}"
            )
        if self.mode not in ADAPTER_MODES:
            raise ConfigError(f"{self.field}.adapters: one of {ADAPTER_MODES}, got {self.mode!r}")
        if self.mode == "per_task" and self.method not in PEFT_METHODS:
            raise ConfigError(
                f"{self.field}.adapters: per_task needs a peft method ({', '.join(PEFT_METHODS)}), "
                f"not {self.method}; use adapters: shared"
            )
        if self.merge_each_experience and self.method != "lora":
            raise ConfigError(
                f"{self.field}.merge_each_experience: only LoRA updates fold into the weights; "
                f"{self.method} cannot (set it false or use method: lora)"
            )

    # -- building -------------------------------------------------------------------------
    def _apply(self, options: dict[str, Any], num_tasks: int) -> None:
        before = {id(p) for p in self.backbone.parameters()}
        if self.method in PEFT_METHODS:
            self._inject_peft(options, num_tasks)
        elif self.method == "bitfit":
            if options:
                raise ConfigError(f"{self.field}: bitfit takes no options, got {sorted(options)}")
            biases = [p for n, p in self.backbone.named_parameters() if n.endswith("bias")]
            if not biases:
                raise ConfigError(
                    f"{self.field}.method: the backbone has no bias parameters to train; "
                    "use lora or adapter"
                )
            for p in biases:
                p.requires_grad_(True)
        else:
            self._call_mneme_method(options)
        new = [p for p in self.backbone.parameters() if id(p) not in before]
        for p in new:
            p.requires_grad_(True)
        self.added = new

    def _inject_peft(self, options: dict[str, Any], num_tasks: int) -> None:
        config_class = _peft_config_class(self.method)
        targets = options.get("target_modules")
        if targets is None:
            raise ConfigError(
                f"{self.field}.target_modules: name the layers to adapt (a regex over module "
                f"names, or a list of names); e.g. {_layer_examples(self.backbone)}"
            )
        if isinstance(targets, str):
            try:  # peft matches it with re.fullmatch, where a bad pattern is a traceback
                re.compile(targets)
            except re.error as err:
                raise ConfigError(
                    f"{self.field}.target_modules: {targets!r} is not a regular expression "
                    f"({err}); escape a literal dot as '\\.', or give a list of layer names"
                ) from None
        try:
            config = config_class(**options)
        except TypeError as err:
            fields = sorted(getattr(config_class, "__dataclass_fields__", {}))
            raise ConfigError(
                f"{self.field}: {err} (arguments of peft.{config_class.__name__}: "
                f"{', '.join(f for f in fields if not f.startswith('_'))[:400]})"
            ) from None
        except ValueError as err:
            raise ConfigError(f"{self.field}: {err}") from None
        names = [f"task_{t}" for t in range(num_tasks)] if self.mode == "per_task" else [SHARED]
        tuner_class = _peft_tuner_class(self.method)
        for name in names:
            try:
                # as peft.inject_adapter_in_model, which builds this tuner and drops it: the
                # backbone keeps its class, and the tuner (a plain attribute of this object,
                # not a submodule) can merge_and_unload the adapter for an export
                self.tuner = tuner_class(self.backbone, config, adapter_name=name)
            except ValueError as err:
                if not peft_target_modules_missing(err):
                    raise ConfigError(f"{self.field}: {str(err).splitlines()[0]}") from None
                raise ConfigError(
                    f"{self.field}.target_modules: no layer of the backbone matches {targets!r}; "
                    f"closest layer names: {_close_layers(self.backbone, targets)}"
                ) from None
        self.adapter_names = names

    def _call_mneme_method(self, options: dict[str, Any]) -> None:
        if self.method == "prompt":
            from mneme.app.finetuning.prompt_tuning import add_visual_prompts as add
        else:
            from mneme.app.finetuning.bottleneck_adapters import add_bottleneck_adapters as add

            options.setdefault("input_shape", self.input_shape)
        try:
            add(self.backbone, **options)
        except TypeError as err:
            raise ConfigError(f"{self.field}: {err} (for method {self.method})") from None

    # -- training -------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def run(self, forward: Callable[[Tensor], Tensor], x: Tensor, task: Tensor | None) -> Tensor:
        """``forward(x)`` with each sample's adapter active (one pass per task present)."""
        if len(self.adapter_names) == 1 or task is None:
            return forward(x)
        from peft.tuners.tuners_utils import set_adapter

        outputs: Tensor | None = None
        for t in torch.unique(task).tolist():
            rows = (task == t).nonzero(as_tuple=True)[0]
            set_adapter(self.backbone, self.adapter_names[t])
            out = forward(x[rows])
            if outputs is None:
                outputs = out.new_empty((len(x), *out.shape[1:]))
            outputs[rows] = out
        # peft's set_adapter freezes the adapters it deactivates; each task's adapter trains.
        for p in self.added:
            p.requires_grad_(True)
        return outputs

    @torch.no_grad()
    def end_experience(self) -> bool:
        """Fold the LoRA update into the backbone and restart it (``merge_each_experience``).
        Returns whether the weights changed."""
        if not self.merge_each_experience:
            return False
        from peft.tuners.lora import LoraLayer

        for layer in self.backbone.modules():
            if isinstance(layer, LoraLayer):
                for name in self.adapter_names:
                    base = layer.get_base_layer()
                    base.weight += layer.get_delta_weight(name).to(base.weight.dtype)
                    layer.reset_lora_parameters(name, init_lora_weights=True)
        self.merged = True
        return True

    @torch.no_grad()
    def merge_and_unload(self) -> bool:
        """Fold the peft adapter into the backbone's weights and put each adapted layer's
        base layer back in its place (peft's own ``merge_and_unload``: LoRA, also over
        ``nn.MultiheadAttention``, LoHa, LoKr, IA3), for an export. Returns whether anything
        was merged; per-task adapters cannot be (each sample needs its task's)."""
        if self.tuner is None:
            return False
        if len(self.adapter_names) > 1:
            raise ConfigError(
                f"{self.field}.adapters: per_task adapters need each sample's task id, which "
                "an exported model does not take; export a model with adapters: shared"
            )
        self.tuner.merge_and_unload(safe_merge=True)
        self.tuner, self.merged = None, True
        return True

    def unchanged_tensors(self) -> list[str]:
        """State-dict names (relative to the backbone) of the tensors training leaves as the
        source made them: frozen parameters, and the buffers of frozen layers (a batch norm
        with a frozen scale keeps its statistics, see :func:`freeze_norm_statistics`).
        Nothing once a LoRA update was folded in."""
        if self.merged:
            return []
        names = []
        for prefix, module in self.backbone.named_modules():
            params = dict(module.named_parameters(recurse=False))
            names += [_join(prefix, n) for n, p in params.items() if not p.requires_grad]
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                frozen = not module.weight.requires_grad
            else:
                frozen = not any(p.requires_grad for p in params.values())
            if frozen:  # (non-persistent buffers are named too: no state dict holds them)
                names += [_join(prefix, n) for n, _ in module.named_buffers(recurse=False)]
        return names


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _layer_names(backbone: nn.Module) -> list[str]:
    kinds = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding, nn.MultiheadAttention)
    return [n for n, m in backbone.named_modules() if n and isinstance(m, kinds)]


def _layer_examples(backbone: nn.Module) -> str:
    names = _layer_names(backbone)
    return ", ".join(names[:: max(1, len(names) // 4)][:4]) or "none"


def _close_layers(backbone: nn.Module, targets: Any) -> str:
    names = _layer_names(backbone)
    wanted = [targets] if isinstance(targets, str) else list(targets)
    # Compare with the last part of each name (``conv_pw``), and with the whole name.
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close: list[str] = []
    for want in wanted:
        leaf = re.sub(r"[^\w]+", " ", str(want)).split()[-1:] or [str(want)]
        close += difflib.get_close_matches(leaf[0], leaves, n=3, cutoff=0.4)
        close += difflib.get_close_matches(str(want), names, n=2, cutoff=0.4)
    close = list(dict.fromkeys(close)) or leaves[:5]
    return ", ".join(close[:5])


def freeze_norm_statistics(module: nn.Module) -> None:
    """Batch norms of a module in train mode train exactly when their scale does: a frozen
    layer keeps its running statistics, an unfrozen one updates them. (Lightning's
    ``BaseFinetuning`` instead stops tracking the statistics of frozen layers, which makes
    batch norm use batch statistics even at evaluation.)"""
    if not module.training:
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.train(m.weight.requires_grad)
