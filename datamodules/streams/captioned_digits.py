"""Captioned digits: images paired with template captions, class-incremental.

Built with Avalanche's ``nc_benchmark`` like ``SplitDigits``; the scenario also carries
``class_names`` (number words) and ``prompt_templates`` (held-out templates) for zero-shot
evaluation. Samples are ``(image, label, text)``: ``sample_keys: [image, label, text, task]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mneme.datamodules.streams.captions import (
    DEFAULT_TOKENIZER,
    EVAL_TEMPLATES,
    NUMBER_WORDS,
    TRAIN_TEMPLATES,
    PairedTensors,
    check_templates,
    template_captions,
    tokenize,
)
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.digits import load_digits_tensors, load_mnist_npz, split_benchmark
from mneme.datamodules.streams.registry import stream

SAMPLE_KEYS = ("image", "label", "text", "task")


def captioned(
    images: torch.Tensor,
    labels: torch.Tensor,
    templates: Sequence[str],
    seed: int,
    tokenizer: str,
    context_length: int,
) -> PairedTensors:
    """``(image, label, caption tokens)`` samples, one template drawn per image."""
    captions = template_captions(labels, NUMBER_WORDS, templates, seed)
    return PairedTensors([images, tokenize(captions, tokenizer, context_length)], labels)


@stream
def SplitCaptionedDigits(  # noqa: N802 - named like Avalanche's benchmark factories
    n_experiences: int = 5,
    *,
    path: str | None = None,
    seed: int | None = 0,
    fixed_class_order: Sequence[int] | None = None,
    train_templates: Sequence[str] = TRAIN_TEMPLATES,
    eval_templates: Sequence[str] = EVAL_TEMPLATES,
    tokenizer: str = DEFAULT_TOKENIZER,
    context_length: int = 16,
    caption_seed: int = 0,
):
    """Class-incremental captioned digits: scikit-learn's 8x8 digits (embedded, default) or
    MNIST from an ``.npz`` (``path``; first 8,000 rows train). Training captions use
    ``train_templates``; test captions and zero-shot prompts the held-out ``eval_templates``.

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.SplitCaptionedDigits
          benchmark_args: {n_experiences: 5, context_length: 16}
          sample_keys: [image, label, text, task]
    """
    check_templates(train_templates, "train_templates")
    check_templates(eval_templates, "eval_templates")
    train, test = load_mnist_npz(path) if path else load_digits_tensors(seed=0)
    args = (tokenizer, context_length)
    train_labels, test_labels = torch.tensor(train.targets), torch.tensor(test.targets)
    scenario = split_benchmark(
        captioned(train.inputs, train_labels, train_templates, caption_seed, *args),
        captioned(test.inputs, test_labels, eval_templates, caption_seed + 1, *args),
        n_experiences,
        False,
        seed,
        fixed_class_order,
        False,
    )
    return DeclaredStream(
        scenario,
        fields=SAMPLE_KEYS,
        class_names=list(NUMBER_WORDS),
        prompt_templates=list(eval_templates),
    )
