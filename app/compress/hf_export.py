"""A trained :class:`~mneme.app.ContinualLM` as a plain Hugging Face model folder: every
peft adapter folded into the weights (what ``merge_and_unload`` does), ``save_pretrained``
with safetensors, and the tokenizer beside it. ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it without Mneme.

    python -m mneme.app.compress.hf_export CKPT OUTPUT_FOLDER
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from mneme.app.core.errors import ConfigError
from torch import nn


def adapter_names(layer: nn.Module) -> list[str]:
    """Every adapter a peft tuner layer holds (active or not: O-LoRA's old ones too)."""
    names: set[str] = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        names |= set(getattr(layer, attr, {}) or {})
    return sorted(names)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> int:
    """Fold every peft adapter of ``model`` (all of them, e.g. O-LoRA's one per domain) into
    its base layer and put the base layer in its place; returns the layers merged."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapter either
        return 0
    merged = 0
    for name, layer in list(model.named_modules()):
        if not name or not isinstance(layer, BaseTunerLayer):
            continue
        names = adapter_names(layer)
        if names:
            layer.merge(safe_merge=True, adapter_names=names)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
        merged += 1
    return merged


def plain_model(lm: nn.Module) -> nn.Module:
    """A copy of the module's Hugging Face model with its adapters merged, in eval mode."""
    model = copy.deepcopy(lm)
    merge_and_unload(model)
    if "adaptation" in model.__dict__:  # Mneme's bookkeeping, not the model's
        del model.__dict__["adaptation"]
    if getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()  # a training setting, not the model's
    model.config.use_cache = True  # generation after export
    return model.eval().requires_grad_(False)


def save_language_model(module, folder: str | Path) -> Path:
    """Write ``module``'s model (adapters merged) and tokenizer to ``folder``, which must not
    exist yet or be empty (an earlier export is never written over)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"--output: '{folder}' exists and is not empty (an earlier export, kept); pass "
            "another folder or delete it"
        )
    if module.tokenizer is None:
        raise ConfigError("ckpt_path: the checkpoint holds no tokenizer; export a ContinualLM run")
    folder.mkdir(parents=True, exist_ok=True)
    plain_model(module.lm).save_pretrained(folder, safe_serialization=True)
    module.tokenizer.save_pretrained(folder)
    return folder


def export_checkpoint(ckpt_path: str | Path, output: str | Path) -> Path:
    """Load a ContinualLM checkpoint (tensors and plain data only) and save it as a folder."""
    from mneme.app.models.lm import ContinualLM

    if not Path(ckpt_path).is_file():
        raise ConfigError(f"--ckpt_path: no file '{ckpt_path}'")
    module = ContinualLM.load_from_checkpoint(str(ckpt_path), map_location="cpu", weights_only=True)
    return save_language_model(module, output)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m mneme.app.compress.hf_export CKPT OUTPUT_FOLDER")
    try:
        folder = export_checkpoint(argv[0], argv[1])
    except ConfigError as error:
        sys.exit(f"mneme: error: {error}")
    print(f"exported {folder} (AutoModelForCausalLM.from_pretrained loads it)")


if __name__ == "__main__":
    main(sys.argv[1:])
