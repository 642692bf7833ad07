"""A synthetic text-domain stream for the language-model tests: each domain a Markov chain
of its own over a small word vocabulary, served as LM blocks (``input_ids``, ``labels``,
``attention_mask``, ``label`` = ``task`` = domain), with a word-level tokenizer saved as a
Hugging Face folder. Fast and seeded; the real text stream lives in datamodules/text."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from mneme.datamodules.data.experiences import TensorExperience
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.registry import stream

WORDS = 40
FIELDS = ("input_ids", "label", "labels", "attention_mask", "task")
SPECIALS = ("<|endoftext|>", "<pad>")


def save_tokenizer(folder: str | Path) -> Path:
    """A word-level tokenizer of ``w0 .. w{WORDS-1}`` plus EOS and pad, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(WORDS)}
    vocab.update({token: WORDS + n for n, token in enumerate(SPECIALS)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=SPECIALS[0], bos_token=SPECIALS[0], pad_token=SPECIALS[1]
    )
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _domain_blocks(domain: int, n: int, block: int, seed: int, split: int) -> torch.Tensor:
    """``n`` blocks of a domain's Markov chain: each word has two likely successors."""
    rule = torch.Generator().manual_seed(1000 + domain)
    successors = torch.randint(WORDS, (WORDS, 2), generator=rule)
    draw = torch.Generator().manual_seed(seed * 7919 + domain * 31 + split)
    ids = torch.empty(n, block, dtype=torch.long)
    ids[:, 0] = torch.randint(WORDS, (n,), generator=draw)
    for t in range(1, block):
        pick = torch.randint(2, (n,), generator=draw)
        ids[:, t] = successors[ids[:, t - 1], pick]
    return ids


EOS_ID, PAD_ID = WORDS, WORDS + 1
PROMPT = 6  # instruction form: prompt tokens, then the answer ``w<domain>`` and EOS


def _experience(
    domain: int, n: int, block: int, seed: int, split: int, form: str = "lm"
) -> TensorExperience:
    ids = _domain_blocks(domain, n, block, seed, split)
    labels = ids.clone()  # the lm form: every token scored (the model shifts)
    mask = torch.ones_like(ids)
    if form == "instruction":  # as datamodules/text/packing.py's instruction blocks
        ids[:, PROMPT:] = PAD_ID
        ids[:, PROMPT], ids[:, PROMPT + 1] = domain, EOS_ID
        labels = torch.full_like(ids, -100)
        labels[:, PROMPT : PROMPT + 2] = ids[:, PROMPT : PROMPT + 2]
        mask[:, PROMPT + 2 :] = 0
    domains = torch.full((n,), domain, dtype=torch.long)
    return TensorExperience({
        "input_ids": ids, "labels": labels, "attention_mask": mask,
        "label": domains, "task": domains.clone(),
    })  # fmt: skip


@stream
def SyntheticTextDomains(  # noqa: N802 - named like the other stream factories
    n_domains: int = 3, train_blocks: int = 48, test_blocks: int = 16, block_size: int = 16,
    seed: int = 0, form: str = "lm",
):  # fmt: skip
    """``n_domains`` domains of LM blocks (experience ``k`` = domain ``k``); ``form:
    instruction``: a prompt of the domain's text, the answer ``w<domain>``."""
    scenario = SimpleNamespace(
        train_stream=[_experience(d, train_blocks, block_size, seed, 0, form)
                      for d in range(n_domains)],
        test_stream=[_experience(d, test_blocks, block_size, seed, 1, form)
                     for d in range(n_domains)],
    )  # fmt: skip
    return DeclaredStream(scenario, fields=FIELDS)


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
STREAM = "tests.lm_stream.SyntheticTextDomains"


LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def make_lm(tokenizer_dir, peft=LORA, lr=1e-2, **kwargs):
    """A tiny Llama over the synthetic stream's tokenizer (built in ``setup``)."""
    from mneme.app.models.lm import ContinualLM

    return ContinualLM(
        model_config=TINY_LLAMA,
        tokenizer=tokenizer_dir,
        peft=peft,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        **kwargs,
    )


def make_stream(n_domains=3, **kwargs):
    from mneme.datamodules.continual import ContinualDataModule

    args = {"n_domains": n_domains, **kwargs}
    return ContinualDataModule(STREAM, args, batch_size=16, eval_batch_size=16)
