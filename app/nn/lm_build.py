"""Building a Hugging Face causal language model and its tokenizer for :class:`ContinualLM`:
from a local folder, a hub name, or a config with random weights; each failure one line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.app.core.seeding import run_seed
from torch import nn

# Names of the Hugging Face tokenizer files any of which makes a folder hold a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_local(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def _offline_error(field: str, name: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"{field}: cannot fetch '{name}' from the Hugging Face hub (no internet, or no such "
        f"model: {str(err).splitlines()[0][:160]}); download it where there is internet "
        f"(huggingface-cli download {name} --local-dir DIR) and point {field} at that folder"
    )


def load_pretrained(name: str, trust_remote_code: bool, field: str = "model.model") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name)``: a folder, or a hub name (downloads).
    transformers reads ``*.safetensors`` first and ``*.bin`` with ``weights_only``;
    ``trust_remote_code`` stays off unless the config's field of that name says so."""
    from transformers import AutoModelForCausalLM

    local = is_local(name)
    if local:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"{field}: the folder '{name}' has no config.json; point it at a Hugging Face "
                "model folder (save_pretrained's output)"
            )
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(Path(name).expanduser()) if local else name,
            trust_remote_code=trust_remote_code,
            local_files_only=local or _offline(),
        )
    except (OSError, ValueError) as err:
        if not local:
            raise _offline_error(field, name, err) from None
        raise ConfigError(f"{field}: cannot load '{name}': {str(err).splitlines()[0]}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def build_from_config(spec: dict[str, Any], vocab_size: int, trust_remote_code: bool) -> nn.Module:
    """A model of ``spec`` (``{model_type: llama, hidden_size: 64, ...}``, a transformers
    config's fields) with random weights, seeded by the run's seed, and ``vocab_size`` rows
    of embedding (the tokenizer's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ConfigError(
            "model.model_config.model_type: name the architecture (llama, gpt2, qwen2, ...)"
        )
    if spec.get("vocab_size") not in (None, vocab_size):
        raise ConfigError(
            f"model.model_config.vocab_size: {spec['vocab_size']} differs from the tokenizer's "
            f"{vocab_size}; leave it out (it is the tokenizer's)"
        )
    spec["vocab_size"] = vocab_size
    try:
        config = AutoConfig.for_model(model_type, **spec)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model.model_config: {str(err).splitlines()[0]}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_seed())
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(folder: str, field: str):
    """A tokenizer from a folder (``AutoTokenizer``); a folder without one is refused."""
    from transformers import AutoTokenizer

    path = Path(folder).expanduser()
    if is_local(folder) and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{field}: the folder '{folder}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "name a tokenizer folder with model.tokenizer"
        )
    try:
        return AutoTokenizer.from_pretrained(
            str(path) if is_local(folder) else folder,
            local_files_only=is_local(folder) or _offline(),
        )
    except (OSError, ValueError) as err:
        if not is_local(folder):
            raise _offline_error(field, folder, err) from None
        raise ConfigError(f"{field}: cannot load a tokenizer from '{folder}': {err}") from None


def tokenizer_state(tokenizer) -> dict[str, Any]:
    """A fast tokenizer as plain data (its JSON and special tokens), for a checkpoint."""
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return {"json": tokenizer.backend_tokenizer.to_str(), "special": special}


def tokenizer_from_state(state: dict[str, Any]):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(state["json"]), **state["special"]
    )


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what LoRA's target_modules
    name): ``q_proj``, ``v_proj``, ... (GPT-2's ``Conv1D`` counts as linear)."""
    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - transformers always has it
        pass
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, kinds)}
    return sorted(names)


def check_lora_targets(model: nn.Module, spec: dict[str, Any] | None) -> None:
    """LoRA ``target_modules`` given as names, none of which the model has: one line listing
    the model's real linear-layer names (a regex is left to peft)."""
    targets = (spec or {}).get("target_modules")
    if targets is None or isinstance(targets, str) and not targets.isidentifier():
        return
    wanted = [targets] if isinstance(targets, str) else list(targets)
    have = linear_layer_names(model)
    missing = [t for t in wanted if t not in have and t != "all-linear"]
    if missing:
        raise ConfigError(
            f"model.peft.target_modules: the model has no linear layer named {missing}; its "
            f"linear layers: {', '.join(have)}"
        )


def context_length(model: nn.Module) -> int | None:
    """The most positions the model takes (``max_position_embeddings``/``n_positions``)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
