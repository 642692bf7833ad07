"""``TextDomains``: a domain-incremental stream of text for causal language models.

Experience ``k`` is domain ``k``, for training and for test (its held-out documents). The
default stream is a "general" stage (encyclopedia + Python docs) and then news, forum,
reviews; test experience 0 (the general stage's held-out text) is the general column.

The contract with the LM module (``mneme.app.ContinualLM``)
-----------------------------------------------------------
Batches are dicts of LongTensors (``B`` samples, ``T = block_size``):

- ``input_ids`` (B, T): token ids.
- ``labels`` (B, T): the targets, -100 where no loss (padding; the prompt of an
  instruction sample). ``lm`` form: ``labels == input_ids`` except padding; the causal
  shift is done by the Hugging Face model.
- ``attention_mask`` (B, T): 1 on tokens, 0 on padding (padding is on the right).
- ``label`` (B,): the domain index (Replay's per-class buffer is a per-domain buffer).
- ``task`` (B,): the domain index too.

The stream (``datamodule.declaration``, a :class:`TextStream`) carries the tokenizer
(``tokenizer``, a ``transformers`` tokenizer; ``tokenizer_dir``, the folder it was loaded
from: copy it into a run's export), ``vocab_size`` (``len(tokenizer)``: the embedding rows
needed), ``block_size``, ``pad_token_id``, ``eos_token_id``, ``domain_names``, ``forms``
(``lm`` or ``instruction`` per domain), ``train_tokens`` (tokens per training experience)
and ``general_experience`` (0). :func:`instruction_examples` gives an instruction domain's
held-out ``(prompt, answer)`` strings for exact-match evaluation: generate from the prompt
tokenized with ``add_special_tokens=False`` (as in training; a long prompt was already cut
to its end so that it fits), and compare the generation, stripped, with the answer,
stripped. :func:`~mneme.datamodules.text.tokenizer.check_block_size` checks ``block_size``
against a model's positions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.registry import stream
from mneme.datamodules.text.packing import (
    Blocks,
    check_template,
    instruction_blocks,
    pack_documents,
)
from mneme.datamodules.text.sources import ARGS, Document, Domain, parse_domains, read_domain
from mneme.datamodules.text.tokenizer import check_block_size, load_tokenizer, train_tokenizer

FIELDS = ("input_ids", "label", "labels", "attention_mask", "task")
DEFAULT_DATA_ROOT = "../shared/data/text_domains"


@dataclass(frozen=True)
class TextStream(DeclaredStream):
    """A :class:`DeclaredStream` of token blocks, with its tokenizer (see the module
    docstring for every field)."""

    tokenizer: Any = None
    tokenizer_dir: str = ""
    vocab_size: int = 0
    block_size: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 0
    domain_names: tuple[str, ...] = ()
    forms: tuple[str, ...] = ()
    train_tokens: tuple[int, ...] = ()
    examples: tuple[tuple[tuple[str, str], ...], ...] = ()
    general_experience: int = 0


def instruction_examples(source: Any, domain: int | str) -> list[tuple[str, str]]:
    """The held-out ``(prompt, answer)`` pairs of ``domain`` (index or name) of a
    :class:`TextStream` or of a datamodule serving one (``source.declaration``); empty for
    an ``lm`` domain."""
    text_stream = getattr(source, "declaration", source)
    if not isinstance(text_stream, TextStream):
        raise TypeError(f"expected a TextStream or a datamodule serving one, got {type(source)}")
    names = list(text_stream.domain_names)
    index = names.index(domain) if isinstance(domain, str) else int(domain)
    return list(text_stream.examples[index])


def _split(docs: list[Document], test_size: float, rng: random.Random) -> tuple[list, list]:
    """A seeded held-out share of ``docs`` (at least one, when there are two or more)."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_test = 0 if len(docs) < 2 else min(len(docs) - 1, max(1, round(test_size * len(docs))))
    return [docs[i] for i in order[n_test:]], [docs[i] for i in order[:n_test]]


def _pairs(docs: list[Document], template: str, answer_template: str, field: str) -> list[Document]:
    """Each row with its ``prompt`` and ``answer``: its own, or built from ``text`` and
    ``label``."""
    pairs = []
    for doc in docs:
        if doc.answer is not None:
            prompt = doc.prompt if doc.prompt is not None else doc.text
            pairs.append(replace(doc, prompt=prompt))
        elif doc.label is not None and doc.prompt is None:
            prompt, answer = template.format(text=doc.text), answer_template.format(label=doc.label)
            pairs.append(replace(doc, prompt=prompt, answer=answer))
        else:
            raise ConfigError(
                f"{field}: {doc.where} has no answer (an 'answer' or a 'label' field) for "
                "the instruction form; give every row one, or set form: lm for this domain"
            )
    return pairs


def _ids(tokenizer: Any, texts: Sequence[str], budget: int | None = None) -> list[list[int]]:
    """Token ids of ``texts`` (no special tokens), in chunks, stopping once ``budget``
    tokens (plus one separator each) are reached: a capped domain is not tokenized whole."""
    ids: list[list[int]] = []
    total, chunk = 0, 64
    for start in range(0, len(texts), chunk):
        part = tokenizer(
            list(texts[start : start + chunk]), add_special_tokens=False, verbose=False
        )
        ids += part["input_ids"]
        total += sum(len(i) + 1 for i in part["input_ids"])
        if budget is not None and total > budget:
            break
    return ids


def _cap(blocks: Blocks, max_tokens: int | None) -> Blocks:
    """The first blocks holding at most ``max_tokens`` tokens (at least one block)."""
    if max_tokens is None:
        return blocks
    counts = blocks.attention_mask.sum(1).cumsum(0)
    return blocks.head(max(1, int((counts <= max_tokens).sum())))


def _encode(
    docs: list[Document], domain: Domain, tok: Any, block_size: int, cap: int | None
) -> tuple[Blocks, list[tuple[str, str]]]:
    """The blocks of ``docs`` in the domain's form (at most ``cap`` tokens), and for an
    instruction domain the ``(prompt, answer)`` of each block, the prompt as the model sees
    it (the start of a long one cut off)."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    if domain.form == "lm":
        ids = _ids(tok, [d.text for d in docs], cap)
        return _cap(pack_documents(ids, block_size, eos, pad), cap), []
    prompts = _ids(tok, [str(d.prompt) for d in docs])
    answers = _ids(tok, [str(d.answer) for d in docs])
    blocks, kept = instruction_blocks(prompts, answers, block_size, eos, pad, domain.field_name)
    pairs = [
        (str(d.prompt) if n == len(ids) else tok.decode(ids[len(ids) - n :]), str(d.answer))
        for d, ids, n in zip(docs, prompts, kept, strict=True)
    ]
    blocks = _cap(blocks, cap)
    return blocks, pairs[: len(blocks)]


def _dataset(blocks: Blocks, domain: int):
    from avalanche.benchmarks.utils import AvalancheDataset
    from mneme.datamodules.streams.captions import PairedTensors

    targets = torch.full((len(blocks),), domain, dtype=torch.long)
    fields = [blocks.input_ids, blocks.labels, blocks.attention_mask, targets]
    return AvalancheDataset([PairedTensors(fields, targets)])


@stream
def TextDomains(  # noqa: N802 - named like Avalanche's benchmark factories
    domains: Sequence[Any] | None = None,
    *,
    data_root: str = DEFAULT_DATA_ROOT,
    form: str = "lm",
    block_size: int = 64,
    tokenizer: str = "train",
    vocab_size: int = 1024,
    cache_dir: str | None = None,
    test_size: float = 0.1,
    seed: int = 0,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    max_test_tokens: int | None = None,
    max_positions: int | None = None,
    template: str = "{text}\nTopic:",
    answer_template: str = " {label}",
):
    """A domain-incremental text stream, one experience per domain (see the module
    docstring for the batches and :mod:`~mneme.datamodules.text.sources` for ``domains``).

    Args:
        domains: the domains in stream order; default a ``general`` stage (encyclopedia +
            Python docs), then ``news``, ``forum``, ``reviews``.
        data_root: the folder of ``<name>.jsonl`` files that bare names refer to.
        form: ``lm`` (packed documents) or ``instruction`` (prompt/answer pairs, loss on
            the answer); a domain mapping may set its own ``form``.
        block_size: tokens per sample.
        tokenizer: a folder with a Hugging Face tokenizer, or ``train`` (a byte-level BPE of
            ``vocab_size`` trained on the training documents, cached in ``cache_dir``,
            default ``~/.cache/mneme/tokenizers``).
        test_size: the held-out share of each source's documents, split by ``seed``.
        max_documents: documents read per source (a Hugging Face dataset: 10,000 unless set).
        max_tokens, max_test_tokens: tokens kept per training / test experience (the same
            budget for every domain).
        max_positions: the model's positions, if known: a longer ``block_size`` is refused.
        template, answer_template: the instruction pair made of a row's ``text`` and
            ``label`` (rows with ``prompt``/``answer`` fields use those).

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.TextDomains
          benchmark_args: {block_size: 64, vocab_size: 1024, max_tokens: 20000}
    """
    from avalanche.benchmarks.scenarios import benchmark_from_datasets

    check_block_size(block_size, max_positions)
    if not 0 < test_size < 1:
        raise ConfigError(f"{ARGS}.test_size: a share in (0, 1), got {test_size}")
    if form not in ("lm", "instruction"):
        raise ConfigError(f"{ARGS}.form: 'lm' or 'instruction', got {form!r}")
    check_template(template, "text", f"{ARGS}.template")
    check_template(answer_template, "label", f"{ARGS}.answer_template")
    parsed: list[Domain] = parse_domains(domains, data_root, form)
    if len({d.name for d in parsed}) != len(parsed):
        raise ConfigError(
            f"{ARGS}.domains: names repeat {[d.name for d in parsed]}; give each a name"
        )

    # Read and split every domain first: the tokenizer is trained on all training text.
    splits: list[tuple[list[Document], list[Document]]] = []
    for domain in parsed:
        rng = random.Random(f"{seed}:{domain.name}")
        train: list[Document] = []
        test: list[Document] = []
        for docs in read_domain(domain, max_documents):
            part_train, part_test = _split(docs, test_size, rng)
            train += part_train
            test += part_test
        if not test:
            raise ConfigError(
                f"{domain.field_name}: '{domain.name}' has {len(train)} document(s); a domain "
                "needs at least 2 (one held out for test)"
            )
        rng.shuffle(train)  # sources mixed, so that max_tokens keeps some of each
        if domain.form == "instruction":
            field = domain.field_name
            train = _pairs(train, template, answer_template, field)
            test = _pairs(test, template, answer_template, field)
        splits.append((train, test))

    if tokenizer == "train":
        texts = [
            f"{doc.prompt}{doc.answer}" if doc.answer is not None else doc.text
            for train, _ in splits
            for doc in train
        ]
        tok, folder = train_tokenizer(texts, vocab_size, cache_dir)
    else:
        tok, folder = load_tokenizer(str(tokenizer)), tokenizer

    train_sets, test_sets, examples, train_tokens = [], [], [], []
    for index, (domain, (train, test)) in enumerate(zip(parsed, splits, strict=True)):
        train_blocks, _ = _encode(train, domain, tok, block_size, max_tokens)
        test_blocks, held_out = _encode(test, domain, tok, block_size, max_test_tokens)
        train_sets.append(_dataset(train_blocks, index))
        test_sets.append(_dataset(test_blocks, index))
        examples.append(tuple(held_out))
        train_tokens.append(int(train_blocks.attention_mask.sum()))

    scenario = benchmark_from_datasets(train=train_sets, test=test_sets)
    return TextStream(
        scenario,
        fields=FIELDS,
        tokenizer=tok,
        tokenizer_dir=str(folder),
        vocab_size=len(tok),
        block_size=block_size,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        domain_names=tuple(d.name for d in parsed),
        forms=tuple(d.form for d in parsed),
        train_tokens=tuple(train_tokens),
        examples=tuple(examples),
    )
