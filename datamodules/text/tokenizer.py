"""The tokenizer of a text stream: a Hugging Face tokenizer folder, or a byte-level BPE
trained on the stream's training text.

``tokenizer: train`` trains a byte-level BPE (Hugging Face ``tokenizers``: ``models.BPE``
with the ``ByteLevel`` pre-tokenizer and decoder, so every byte sequence round-trips) of
``vocab_size`` on the training documents of every domain (never the held-out ones), and
saves it as a ``PreTrainedTokenizerFast`` folder (``save_pretrained``) at
``<cache_dir>/<hash>``, default ``~/.cache/mneme/tokenizers/<hash>``, where ``<hash>`` is a
SHA-256 of the texts, ``vocab_size`` and the trainer's settings. The folder is written to a
temporary name and renamed into place, so it is never written over (a second run, or a
second DDP rank, finds it and loads it); a run copies it beside its own outputs.

Special tokens of a trained tokenizer: ``<|endoftext|>`` (EOS, also BOS; it separates packed
documents and ends answers) and ``<pad>``. A folder's tokenizer without a pad token pads
with its EOS (padding is masked out of the loss and attention either way).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mneme.app.core.errors import ConfigError
from mneme.app.core.package_files import PREFIX, resolve_path

FIELD = "data.benchmark_args.tokenizer"
EOS = "<|endoftext|>"
PAD = "<pad>"
MIN_FREQUENCY = 2
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
)  # fmt: skip
FORMAT = "mneme-bpe-1"  # bump when the trained tokenizer's recipe changes


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "mneme" / "tokenizers"


def check_block_size(
    block_size: int, max_positions: int | None, field: str = "data.benchmark_args.block_size"
) -> None:
    """Refuse a block longer than the model's positions (``max_position_embeddings``), or
    one shorter than 2 tokens. The LM module calls it with its model's positions."""
    if block_size < 2:
        raise ConfigError(f"{field}: must be at least 2 tokens, got {block_size}")
    if max_positions is not None and block_size > max_positions:
        raise ConfigError(
            f"{field}: {block_size} tokens exceed the model's {max_positions} positions "
            f"(max_position_embeddings); set block_size <= {max_positions}"
        )


def load_tokenizer(folder: str):
    """A Hugging Face tokenizer read from ``folder``'s files only (no download), with a pad
    token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    if not folder.startswith(PREFIX) and not Path(folder).exists():
        raise ConfigError(
            f"{FIELD}: no folder '{folder}'; point it at a folder with a Hugging Face "
            "tokenizer (tokenizer.json), or set tokenizer: train"
        )
    path = resolve_path(folder, FIELD, "dir")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{FIELD}: '{folder}' holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the model's tokenizer beside it (tokenizer.save_pretrained(folder)), "
            "point tokenizer at another folder, or set tokenizer: train"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(
            f"{FIELD}: cannot load the tokenizer in '{folder}' "
            f"({' '.join(str(err).split())[:160]}); point it at a folder saved with "
            "save_pretrained, or set tokenizer: train"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"{FIELD}: the tokenizer in '{folder}' has no EOS token, which marks document "
            "boundaries; set tokenizer.eos_token and save it again, or set tokenizer: train"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _fingerprint(texts: Sequence[str], vocab_size: int) -> str:
    import tokenizers

    digest = hashlib.sha256(f"{FORMAT}|{tokenizers.__version__}|{vocab_size}|".encode())
    digest.update(f"{MIN_FREQUENCY}|{EOS}|{PAD}|{len(texts)}|".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # lengths: no two lists collide
        digest.update(data)
    return digest.hexdigest()[:24]


def train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: str | None = None):
    """``(tokenizer, folder)``: a byte-level BPE of ``vocab_size`` trained on ``texts``
    (deterministic), loaded from the cache when it was trained before."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # 256 byte symbols + the special tokens are the least a byte-level BPE holds.
    if vocab_size < 258 or vocab_size > 1_000_000:
        raise ConfigError(
            f"data.benchmark_args.vocab_size: {vocab_size} is outside 258..1000000 (a "
            "byte-level BPE holds the 256 bytes and 2 special tokens); pick e.g. 512 or 8192"
        )
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = root / _fingerprint(texts, vocab_size)
    if not (folder / "tokenizer.json").is_file():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=MIN_FREQUENCY,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
        fast = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            eos_token=EOS,
            bos_token=EOS,
            pad_token=PAD,
            clean_up_tokenization_spaces=False,  # decode must give back the text as it was
        )
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        except OSError as err:
            raise ConfigError(
                f"data.benchmark_args.cache_dir: cannot write under '{root}' ({err.strerror}); "
                "set cache_dir to a writable folder"
            ) from None
        fast.save_pretrained(staging)
        try:
            os.rename(staging, folder)  # atomic; refused when another run made it first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return load_tokenizer(str(folder)), folder
