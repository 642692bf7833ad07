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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from mneme.datamodules.benchmarks import stream
from mneme.datamodules.captions import DEFAULT_TOKENIZER, PairedTensors, tokenize
from mneme.datamodules.errors import ConfigError
from mneme.datamodules.streams import _split_benchmark

SAMPLE_KEYS = ("image", "label", "text", "task")


def read_manifest(
    path: str | Path, img_key: str, caption_key: str, label_key: str | None, separator: str
) -> list[dict[str, str]]:
    """Rows of the CSV as dicts; a clear error when a named column is absent."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.benchmark_args: no CSV at '{path}'")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            for field, key in (
                ("img_key", img_key),
                ("caption_key", caption_key),
                ("label_key", label_key),
            ):
                if key is not None and key not in columns:
                    raise ConfigError(
                        f"data.benchmark_args.{field}: no column '{key}' in '{path}' (columns: "
                        f"{columns}; check separator={separator!r})"
                    )
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"data.benchmark_args: '{path}' is not UTF-8 text ({err.reason} at byte "
            f"{err.start}); re-save it as UTF-8"
        ) from None
    empty = [i + 2 for i, row in enumerate(rows) if not (row.get(caption_key) or "").strip()]
    if empty:
        raise ConfigError(
            f"data.benchmark_args.caption_key: {len(empty)} row(s) of '{path}' have an empty "
            f"caption (first at line {empty[0]}); fill or drop them"
        )
    return rows


def check_images_exist(paths: Sequence[Path], manifest: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"data.benchmark_args: {len(missing)} image file(s) listed in '{manifest}' do not "
            f"exist (first: '{missing[0]}'); fix the paths or set data.benchmark_args.root"
        )


def load_images(paths: Sequence[Path], image_size: int, channels: int) -> torch.Tensor:
    """``(N, channels, image_size, image_size)`` floats in ``[0, 1]``."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[channels]
    out = np.empty((len(paths), image_size, image_size, channels), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            resized = img.convert(mode).resize((image_size, image_size), Image.BICUBIC)
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
):
    """A stream of image-caption pairs from CSV manifests.

    Image paths are relative to ``root`` (default: the CSV's folder). Without ``test_csv``,
    a random ``test_size`` share of the rows (seeded) is held out.

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.CSVCaptions
          benchmark_args: {train_csv: data/train.tsv, img_key: filepath, caption_key: title,
                      label_key: label, n_experiences: 2}
          sample_keys: [image, label, text, task]
    """
    from avalanche.benchmarks.scenarios import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset

    if channels not in (1, 3):
        raise ConfigError(f"data.benchmark_args.channels: 1 or 3, got {channels}")
    keys = (img_key, caption_key, label_key, separator)
    rows = read_manifest(train_csv, *keys)
    base = Path(root) if root else Path(train_csv).resolve().parent
    if test_csv:
        test_rows = read_manifest(test_csv, *keys)
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

    def dataset(part: list[dict[str, str]], folder: Path) -> PairedTensors:
        paths = [folder / r[img_key] for r in part]
        check_images_exist(paths, test_csv if folder is not base else train_csv)
        images = load_images(paths, image_size, channels)
        text = tokenize([r[caption_key] for r in part], tokenizer, context_length)
        return PairedTensors([images, text], torch.tensor([class_of[r[key]] for r in part]))

    train, test = dataset(rows, base), dataset(test_rows, test_base)
    if label_key:
        scenario = _split_benchmark(train, test, n_experiences, False, seed, None, False)
    else:
        chunks = [np.array_split(np.arange(len(d)), n_experiences) for d in (train, test)]
        scenario = benchmark_from_datasets(
            train=[AvalancheDataset([torch.utils.data.Subset(train, c)]) for c in chunks[0]],
            test=[AvalancheDataset([torch.utils.data.Subset(test, c)]) for c in chunks[1]],
        )
    scenario.class_names = names
    scenario.prompt_templates = list(prompt_templates)
    return scenario
