"""Image-caption pairs from a CSV manifest (open_clip's ``--csv-img-key``/``--csv-caption-key``
convention), served as an Avalanche stream.

Images are read with PIL, converted to RGB (or gray) and resized once when the stream is
built; captions are tokenized with open_clip's tokenizer. Samples are ``(image, label,
text)``: ``sample_keys: [image, label, text, task]``.

Labels: from ``label_key`` when given (class names are the column's distinct values, in
sorted order; experiences split the classes, class-incremental); else each distinct caption
is its own class (its index), and experiences are consecutive chunks of the rows
(instance-incremental), the test rows chunked the same way.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.image_policy import decode_pil, inside_root
from mneme.datamodules.streams.captions import (
    DEFAULT_TOKENIZER,
    PairedTensors,
    check_templates,
    tokenize,
)
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.digits import split_benchmark
from mneme.datamodules.streams.registry import stream

SAMPLE_KEYS = ("image", "label", "text", "task")
MAX_CAPTION_CHARS = 4096  # default cap; open_clip keeps at most context_length tokens anyway
PATH_CHARS = 4096  # PATH_MAX on Linux: the longest image path a manifest field may hold
MAX_IMAGE_SIZE = 1024  # side of the resized images (N x side x side x channels in memory)


class ManifestRow(dict):
    """A manifest row (column -> value) that knows its line in the file, for errors."""

    def __init__(self, values: dict[str, str], line: int) -> None:
        super().__init__(values)
        self.line = line


@contextmanager
def csv_field_limit(chars: int) -> Iterator[None]:
    """Python's csv refuses a field longer than ``chars`` while it reads it (before a
    100 MB caption, or an unclosed quote swallowing the file, is held in memory). The limit
    is process-wide, so it is restored after."""
    previous = csv.field_size_limit(chars)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_manifest(
    path: str | Path,
    img_key: str,
    caption_key: str,
    label_key: str | None,
    separator: str,
    max_caption_chars: int = MAX_CAPTION_CHARS,
    field: str = "train_csv",
) -> list[ManifestRow]:
    """Rows of the CSV, each with its line number; a clear error, naming the file and the
    line, when a named column is absent, a row is malformed, or a caption is empty or
    longer than ``max_caption_chars``. ``field``: the argument that named the file."""
    path = Path(path)
    where = f"data.benchmark_args.{field}: '{path}'"
    if not path.is_file():
        raise ConfigError(f"data.benchmark_args: no CSV at '{path}'")
    limit = max(max_caption_chars, PATH_CHARS)
    rows: list[ManifestRow] = []
    try:
        with path.open(newline="", encoding="utf-8") as f, csv_field_limit(limit):
            # strict: an unclosed quote is an error, not a field that swallows the rest
            # of the file; nor is a stray quote after a quoted field silently dropped.
            reader = csv.reader(f, delimiter=separator, strict=True)
            try:
                columns = next(reader, [])
                for arg, key in (
                    ("img_key", img_key),
                    ("caption_key", caption_key),
                    ("label_key", label_key),
                ):
                    if key is not None and key not in columns:
                        raise ConfigError(
                            f"data.benchmark_args.{arg}: no column '{key}' in '{path}' "
                            f"(columns: {columns}; check separator={separator!r})"
                        )
                for values in reader:
                    if not values:
                        continue  # a blank line, as csv.DictReader skips it
                    if len(values) != len(columns):
                        # a value would be read from the wrong column
                        raise ConfigError(
                            f"{where} line {reader.line_num}: {len(values)} field(s), the "
                            f"header has {len(columns)} (check separator={separator!r}; "
                            "quote a caption that contains it)"
                        )
                    rows.append(
                        ManifestRow(dict(zip(columns, values, strict=True)), reader.line_num)
                    )
            except csv.Error as err:
                raise ConfigError(
                    f"{where} line {reader.line_num}: {err} (a field over {limit:,} "
                    "characters, see data.benchmark_args.max_caption_chars, or an unclosed "
                    "or stray quote); fix the row"
                ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"data.benchmark_args: '{path}' is not UTF-8 text ({err.reason} at byte "
            f"{err.start}); re-save it as UTF-8"
        ) from None
    for row in rows:
        if not row[img_key].strip():
            raise ConfigError(
                f"data.benchmark_args.img_key: '{path}' line {row.line} has no image path; "
                "fill or drop the row"
            )
        if len(row[caption_key]) > max_caption_chars:
            raise ConfigError(
                f"{where} line {row.line}: a caption of {len(row[caption_key]):,} characters, "
                f"over data.benchmark_args.max_caption_chars ({max_caption_chars:,}); "
                "shorten it or raise the limit"
            )
    empty = [row.line for row in rows if not row[caption_key].strip()]
    if empty:
        raise ConfigError(
            f"data.benchmark_args.caption_key: {len(empty)} row(s) of '{path}' have an empty "
            f"caption (first at line {empty[0]}); fill or drop them"
        )
    return rows


def image_paths(
    rows: Sequence[ManifestRow],
    img_key: str,
    root: Path,
    where: str,
    allow_outside_root: bool = False,
) -> list[Path]:
    """Each row's image as a resolved path, kept inside ``root`` unless
    ``allow_outside_root`` (:func:`mneme.datamodules.data.image_policy.inside_root`).
    ``where``: ``data.benchmark_args.<field>: '<manifest>'``, for the error."""
    return [
        inside_root(row[img_key], root, f"{where} line {row.line}", allow_outside_root)
        for row in rows
    ]


def check_images_exist(paths: Sequence[Path], manifest: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"data.benchmark_args: {len(missing)} image file(s) listed in '{manifest}' do not "
            f"exist or are not files (first: '{missing[0]}'); fix the paths or set "
            "data.benchmark_args.root"
        )


def load_images(
    paths: Sequence[Path],
    image_size: int,
    channels: int,
    sources: Sequence[str] | None = None,
) -> torch.Tensor:
    """``(N, channels, image_size, image_size)`` floats in ``[0, 1]``, each image decoded
    by the one image policy (:mod:`mneme.datamodules.data.image_policy`: the size checked
    against the decompression-bomb limit before decoding, every mode to 8-bit gray or RGB);
    a refusal names ``sources[i]`` (``data.benchmark_args.<field>: '<manifest>' line <n>``)."""
    from PIL import Image

    out = np.empty((len(paths), image_size, image_size, channels), dtype=np.uint8)
    for i, p in enumerate(paths):
        where = sources[i] if sources else f"data.benchmark_args: '{p}'"
        small = decode_pil(p, channels, where)
        resized = small.resize((image_size, image_size), Image.BICUBIC)
        out[i] = np.asarray(resized).reshape(image_size, image_size, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255.0)


@stream
def CSVCaptions(  # noqa: N802 - named like Avalanche's benchmark factories
    train_csv: str,
    test_csv: str | None = None,
    n_experiences: int = 1,
    *,
    img_key: str = "filepath",
    caption_key: str = "title",
    label_key: str | None = None,
    separator: str = "\t",
    root: str | None = None,
    image_size: int = 32,
    channels: int = 3,
    test_size: float = 0.2,
    seed: int | None = 0,
    prompt_templates: Sequence[str] = ("{}",),
    tokenizer: str = DEFAULT_TOKENIZER,
    context_length: int = 77,
    allow_outside_root: bool = False,
    max_caption_chars: int = MAX_CAPTION_CHARS,
):
    """A stream of image-caption pairs from CSV manifests.

    Image paths are relative to ``root`` (default: the CSV's folder) and must stay inside
    it (no absolute path, ``..`` or symlink leading out) unless ``allow_outside_root``.
    Captions longer than ``max_caption_chars`` are refused. Without ``test_csv``, a random
    ``test_size`` share of the rows (seeded) is held out.

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.CSVCaptions
          benchmark_args: {train_csv: data/train.tsv, img_key: filepath, caption_key: title,
                      label_key: label, n_experiences: 2}
          sample_keys: [image, label, text, task]
    """
    from avalanche.benchmarks.scenarios import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset

    check_templates(prompt_templates, "prompt_templates")
    if channels not in (1, 3):
        raise ConfigError(f"data.benchmark_args.channels: 1 or 3, got {channels}")
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"data.benchmark_args.image_size: from 1 to {MAX_IMAGE_SIZE}, got {image_size}"
        )
    keys = (img_key, caption_key, label_key, separator, max_caption_chars)
    rows = read_manifest(train_csv, *keys, field="train_csv")
    base = Path(root) if root else Path(train_csv).resolve().parent
    if test_csv:
        test_rows = read_manifest(test_csv, *keys, field="test_csv")
        test_base = Path(root) if root else Path(test_csv).resolve().parent
    else:
        order = np.random.RandomState(seed or 0).permutation(len(rows))
        n_test = max(1, int(round(test_size * len(rows))))
        test_rows = [rows[i] for i in order[:n_test]]
        rows = [rows[i] for i in sorted(order[n_test:])]
        test_base = base
    if not rows:
        raise ConfigError(f"data.benchmark_args.train_csv: '{train_csv}' has no training rows")
    key = label_key or caption_key
    names = sorted({r[key] for r in rows + test_rows})
    class_of = {name: i for i, name in enumerate(names)}

    def dataset(part: list[ManifestRow], folder: Path, field: str) -> PairedTensors:
        manifest = train_csv if field == "train_csv" else test_csv
        where = f"data.benchmark_args.{field}: '{manifest}'"
        paths = image_paths(part, img_key, folder, where, allow_outside_root)
        check_images_exist(paths, manifest)
        sources = [f"{where} line {r.line}" for r in part]
        images = load_images(paths, image_size, channels, sources)
        text = tokenize([r[caption_key] for r in part], tokenizer, context_length)
        return PairedTensors([images, text], torch.tensor([class_of[r[key]] for r in part]))

    train = dataset(rows, base, "train_csv")
    test = dataset(test_rows, test_base, "test_csv" if test_csv else "train_csv")
    if label_key:
        scenario = split_benchmark(train, test, n_experiences, False, seed, None, False)
    else:
        chunks = [np.array_split(np.arange(len(d)), n_experiences) for d in (train, test)]
        scenario = benchmark_from_datasets(
            train=[AvalancheDataset([torch.utils.data.Subset(train, c)]) for c in chunks[0]],
            test=[AvalancheDataset([torch.utils.data.Subset(test, c)]) for c in chunks[1]],
        )
    return DeclaredStream(
        scenario, fields=SAMPLE_KEYS, class_names=names, prompt_templates=list(prompt_templates)
    )
