"""Token blocks of a text stream's two sample forms, as tensors of ``block_size`` tokens.

- ``lm``: documents tokenized (no special tokens added), each followed by EOS (the
  document boundary), concatenated and cut into blocks of exactly ``block_size`` tokens;
  the last partial block is padded (pad id, ``attention_mask`` 0, ``labels`` -100).
  ``labels`` equal ``input_ids`` elsewhere: the causal shift happens inside the model
  (Hugging Face ``*ForCausalLM`` shifts ``labels`` itself).
- ``instruction``: one sample per prompt/answer pair, ``prompt + answer + EOS`` padded on
  the right; ``labels`` are -100 on the prompt and the padding, so the loss falls on the
  answer tokens (and its EOS) only. A prompt too long for the block loses its start (its
  end, e.g. "Topic:", is kept).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from mneme.app.core.errors import ConfigError
from torch import Tensor

IGNORE_INDEX = -100  # what Hugging Face's causal-LM loss skips


@dataclass
class Blocks:
    """``input_ids``, ``labels``, ``attention_mask``: LongTensors ``(N, block_size)``."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def head(self, n: int) -> Blocks:
        return Blocks(self.input_ids[:n], self.labels[:n], self.attention_mask[:n])


def pack_documents(
    token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int, pad_id: int
) -> Blocks:
    """Documents' token ids, each followed by EOS, cut into ``block_size`` blocks."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        stream.append(eos_id)
    n_blocks = -(-len(stream) // block_size)
    ids = torch.full((n_blocks * block_size,), pad_id, dtype=torch.long)
    ids[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    mask = torch.zeros_like(ids)
    mask[: len(stream)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    shape = (n_blocks, block_size)
    return Blocks(ids.view(shape), labels.view(shape), mask.view(shape))


def check_template(template: str, name: str, field: str) -> None:
    """``template`` holds ``{name}`` and no other replacement field (``str.format`` would
    fail on ``{x}``, and read attributes for ``{text.__class__}``)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        fields = None
    if fields != [name]:
        raise ConfigError(
            f"{field}: must contain '{{{name}}}' once and no other braces (write '{{{{' for "
            f"a literal one), got {template!r}"
        )


def instruction_blocks(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    block_size: int,
    eos_id: int,
    pad_id: int,
    field: str,
) -> tuple[Blocks, list[int]]:
    """One block per pair (prompt, answer + EOS), and how many prompt tokens each keeps
    (the start of a long prompt is cut off)."""
    n = len(prompts)
    ids = torch.full((n, block_size), pad_id, dtype=torch.long)
    labels = torch.full((n, block_size), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, block_size), dtype=torch.long)
    kept = []
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        target = [*answer, eos_id]
        room = block_size - len(target)
        if room < 1:
            raise ConfigError(
                f"{field}: an answer of {len(answer)} tokens leaves no room for its prompt in "
                f"block_size {block_size}; raise block_size or shorten the answers"
            )
        prompt = list(prompt)[-room:] if prompt else []
        length = len(prompt) + len(target)
        ids[row, :length] = torch.tensor(prompt + target, dtype=torch.long)
        labels[row, len(prompt) : length] = torch.tensor(target, dtype=torch.long)
        mask[row, :length] = 1
        kept.append(len(prompt))
    return Blocks(ids, labels, mask), kept
