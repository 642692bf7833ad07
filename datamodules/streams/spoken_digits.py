"""Spoken digits paired with captions and digit images, for three-way alignment.

Each clip of ``spoken_digits.npz`` (int16 PCM at 8 kHz, one second, synthesized voices
``accent_variant_speed_pitch``) is paired with a caption of its class and with a
scikit-learn 8x8 digit image of the same class (drawn at random, seeded; train clips from
the image train split, test clips from the test split). Samples are ``(audio, label, image,
text)``: ``sample_keys: [audio, label, image, text, task]``.

Two streams: class-incremental by digit (``split: class``), or domain-incremental by accent
(``split: accent``: one experience per accent, all ten digits in each).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
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
from mneme.datamodules.streams.digits import load_digits_tensors, read_npz, split_benchmark
from mneme.datamodules.streams.registry import stream

SAMPLE_KEYS = ("audio", "label", "image", "text", "task")
SPLITS = ("class", "accent")


SAMPLE_RATE = 8000  # Hz, what spoken_digits.npz holds and the log-mel front end defaults to


def load_spoken_digits(path: str | Path) -> dict[str, np.ndarray]:
    """``audio`` (N, T) int16, ``labels`` (N,), ``accent`` (N,) str from the ``.npz``."""
    path = Path(path)
    field = "data.benchmark_args.path"
    hint = "spoken_digits.npz (e.g. ../shared/data/spoken_digits.npz)"
    names = ("audio", "labels", "voice", "voice_names")
    arrays = read_npz(path, names, hint, optional=("sample_rate",))
    rate = int(arrays["sample_rate"]) if "sample_rate" in arrays else SAMPLE_RATE
    if rate != SAMPLE_RATE:
        raise ConfigError(
            f"{field}: '{path}' holds audio at {rate} Hz; the stream and "
            f"its log-mel front end expect {SAMPLE_RATE} Hz: resample it first"
        )
    audio, labels, voice, names = (arrays[k] for k in ("audio", "labels", "voice", "voice_names"))
    # The front end reads integers as int16 PCM (/ 32768) and floats as they are: another
    # integer type (uint8 PCM is offset by 128, int32 is 65,536 times louder) is misread.
    if audio.ndim != 2 or not (audio.dtype == np.int16 or audio.dtype.kind == "f"):
        raise ConfigError(
            f"{field}: '{path}' audio is {audio.dtype} of shape {audio.shape}; expected int16 "
            "PCM (or floats in [-1, 1]) of shape (clips, samples)"
        )
    integer = all(np.issubdtype(a.dtype, np.integer) for a in (labels, voice))
    if not integer or len({len(audio), len(labels), len(voice)}) != 1:
        raise ConfigError(
            f"{field}: '{path}' needs one integer label and voice per clip; it has "
            f"{len(audio)} clips, labels {labels.dtype} {labels.shape}, voice {voice.dtype} "
            f"{voice.shape}"
        )
    if len(labels) and (labels.min() < 0 or voice.min() < 0 or voice.max() >= len(names)):
        raise ConfigError(
            f"{field}: '{path}' labels must be >= 0 and voice indices in [0, {len(names)}) "
            f"(one per voice name); found labels from {labels.min()}, voice in "
            f"[{voice.min()}, {voice.max()}]"
        )
    if len(labels) and labels.max() >= len(NUMBER_WORDS):  # before anything sized by class
        raise ConfigError(
            f"{field}: '{path}' holds the label {int(labels.max()):,}; spoken digits are "
            f"labelled 0..{len(NUMBER_WORDS) - 1} (captions and paired images are by digit): "
            "relabel the clips"
        )
    accents = np.array([str(n).split("_")[0] for n in names])  # accent_variant_speed_pitch
    return {"audio": audio, "labels": labels.astype(np.int64), "accent": accents[voice]}


def paired_images(labels: np.ndarray, images: torch.Tensor, image_labels, seed: int):
    """For each label, a random image of the same class (with replacement, seeded)."""
    rng = np.random.RandomState(seed)
    image_labels = np.asarray(image_labels)
    index = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(image_labels == c)
        slots = np.flatnonzero(labels == c)
        index[slots] = rng.choice(members, size=len(slots))
    return images[torch.from_numpy(index)]


@stream
def SpokenDigits(  # noqa: N802 - named like Avalanche's benchmark factories
    path: str,
    n_experiences: int = 5,
    *,
    split: str = "class",
    accents: Sequence[str] | None = None,
    seed: int | None = 0,
    fixed_class_order: Sequence[int] | None = None,
    test_size: float = 0.25,
    train_templates: Sequence[str] = TRAIN_TEMPLATES,
    eval_templates: Sequence[str] = EVAL_TEMPLATES,
    tokenizer: str = DEFAULT_TOKENIZER,
    context_length: int = 16,
):
    """Spoken digits with captions and images, class- or accent-incremental.

    ``n_experiences`` applies to ``split: class``; with ``split: accent`` there is one
    experience per accent, in ``accents`` order (default: sorted). The train/test split is
    stratified by accent and digit (``test_size``, seeded by ``seed`` or 0).

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.SpokenDigits
          benchmark_args: {path: ../shared/data/spoken_digits.npz, split: accent}
          sample_keys: [audio, label, image, text, task]
    """
    from avalanche.benchmarks.scenarios import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset
    from sklearn.model_selection import train_test_split

    check_templates(train_templates, "train_templates")
    check_templates(eval_templates, "eval_templates")
    if split not in SPLITS:
        raise ConfigError(f"data.benchmark_args.split: one of {SPLITS}, got '{split}'")
    data = load_spoken_digits(path)
    labels, accent = data["labels"], data["accent"]
    known = sorted(set(accent.tolist()))
    accents = list(accents or known)
    if not set(accents) <= set(known):
        raise ConfigError(f"data.benchmark_args.accents: choose from {known}, got {accents}")
    keep = np.flatnonzero(np.isin(accent, accents))
    strata = np.array([f"{a}/{y}" for a, y in zip(accent[keep], labels[keep], strict=True)])
    train_idx, test_idx = train_test_split(
        keep, test_size=test_size, random_state=seed or 0, stratify=strata
    )
    digits_train, digits_test = load_digits_tensors(seed=0)
    audio = torch.from_numpy(data["audio"])

    def paired(index: np.ndarray, digits, templates, caption_seed: int) -> PairedTensors:
        y = torch.from_numpy(labels[index])
        images = paired_images(labels[index], digits.inputs, digits.targets, caption_seed)
        captions = template_captions(y, NUMBER_WORDS, templates, caption_seed)
        text = tokenize(captions, tokenizer, context_length)
        return PairedTensors([audio[torch.from_numpy(index)], images, text], y)

    if split == "class":
        scenario = split_benchmark(
            paired(train_idx, digits_train, train_templates, 0),
            paired(test_idx, digits_test, eval_templates, 1),
            n_experiences,
            False,
            seed,
            fixed_class_order,
            False,
        )
    else:
        streams = {"train": [], "test": []}
        for e, name in enumerate(accents):
            for stream, index, digits, templates in (
                ("train", train_idx, digits_train, train_templates),
                ("test", test_idx, digits_test, eval_templates),
            ):
                rows = index[accent[index] == name]
                seed_e = 2 * e + (stream == "test")
                streams[stream].append(AvalancheDataset([paired(rows, digits, templates, seed_e)]))
        scenario = benchmark_from_datasets(**streams)
        scenario.accents = accents
    return DeclaredStream(
        scenario,
        fields=SAMPLE_KEYS,
        class_names=list(NUMBER_WORDS),
        prompt_templates=list(eval_templates),
    )
