"""``CSVImageStream``: a stream of image files listed in a CSV manifest (rows
``path,label[,split]``, paths relative to ``root``, default the CSV's folder, kept inside it;
``split`` says ``train``/``test``; integer labels are class indices, other labels are class
names, sorted). ``experience_key`` splits experiences by a column's values
(domain-incremental) instead of by class. How file streams load and seed their images:
:mod:`mneme.datamodules.streams.files`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.file_experiences import ARGS, FIELDS, make_codec
from mneme.datamodules.data.labels import check_labels
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.file_splits import class_incremental, holdout, split_experiences
from mneme.datamodules.streams.registry import stream
from torch import Tensor


def read_image_manifest(
    path: str | Path, path_key: str, label_key: str, extra: Sequence[str | None], field: str
) -> list[Any]:
    """The rows of a CSV manifest (``csv.DictReader``), each knowing its line; a missing
    column or an empty path/label is refused naming the file and line."""
    from mneme.datamodules.streams.csv_captions import ManifestRow

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: no CSV at '{path}'; point it at a path,label[,split] file")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for arg, key in (("path_key", path_key), ("label_key", label_key), *extra):
            if key is not None and key not in columns:
                raise ConfigError(
                    f"{ARGS}.{arg}: no column '{key}' in '{path}' (columns: {columns}); name "
                    "one of them or add the column"
                )
        rows = [ManifestRow(row, reader.line_num) for row in reader]
    for row in rows:
        for key in (path_key, label_key):
            if not (row.get(key) or "").strip():
                raise ConfigError(
                    f"{field}: '{path}' line {row.line} has an empty '{key}'; fill or drop the row"
                )
    if not rows:
        raise ConfigError(f"{field}: '{path}' has no rows")
    return rows


def label_indices(values: Sequence[str], where: str) -> tuple[list[str], dict[str, int]]:
    """Integer labels are class indices (checked against ``data.max_classes`` before the
    names of ``0..largest`` are made); other labels are names, indexed in sorted order."""
    if all(v.strip().isdigit() for v in values):
        largest = max(int(v) for v in values)
        check_labels(largest, where)
        return [str(i) for i in range(largest + 1)], {v: int(v) for v in set(values)}
    names = sorted(set(values))
    return names, {name: i for i, name in enumerate(names)}


@stream
def CSVImageStream(  # noqa: N802 - named like Avalanche's benchmark factories
    train_csv: str,
    n_experiences: int = 5,
    *,
    test_csv: str | None = None,
    root: str | None = None,
    path_key: str = "path",
    label_key: str = "label",
    split_key: str | None = None,
    experience_key: str | None = None,
    test_size: float = 0.2,
    seed: int | None = 0,
    fixed_class_order: Sequence[int] | None = None,
    return_task_id: bool = False,
    image_size: int = 32,
    channels: int = 3,
    decoder: str = "torchvision",
    train_transform: Any = None,
    eval_transform: Any = None,
    allow_outside_root: bool = False,
    normalize: Sequence[float] | None = None,
):
    """A stream of image files listed in a CSV manifest (``path,label[,split]`` rows).

    Test rows: ``test_csv``, or the rows whose ``split_key`` column says ``test`` (the
    others say ``train``), or a seeded per-class ``test_size`` share. Experiences: by class
    (class-incremental, as :func:`ImageFolderStream`), or by the values of
    ``experience_key`` (sorted; every class in each, domain-incremental; ``n_experiences``
    is then the number of values). Paths are relative to ``root`` (default: the CSV's
    folder) and stay inside it unless ``allow_outside_root``.

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.CSVImageStream
          benchmark_args: {train_csv: data/images.csv, split_key: split, n_experiences: 2}
          materialize: false
          num_workers: 2
    """
    from mneme.datamodules.streams.csv_captions import check_images_exist, image_paths

    field = f"{ARGS}.train_csv"
    codec = make_codec(
        image_size, channels, decoder, train_transform, eval_transform, field, normalize
    )
    extra = (("split_key", split_key), ("experience_key", experience_key))
    rows = read_image_manifest(train_csv, path_key, label_key, extra, field)
    parts = {"train": rows}
    if test_csv is not None:
        parts["test"] = read_image_manifest(
            test_csv, path_key, label_key, extra, f"{ARGS}.test_csv"
        )
    elif split_key is not None:
        bad = [r for r in rows if r[split_key].strip() not in ("train", "test")]
        if bad:
            raise ConfigError(
                f"{ARGS}.split_key: '{train_csv}' line {bad[0].line} has {split_key}="
                f"{bad[0][split_key]!r}; the column says 'train' or 'test'"
            )
        parts = {s: [r for r in rows if r[split_key].strip() == s] for s in ("train", "test")}
    values = [r[label_key].strip() for rs in parts.values() for r in rs]
    names, class_of = label_indices(
        values, f"{ARGS}.label_key: column '{label_key}' of '{train_csv}'"
    )

    def files(part: list[Any], manifest: str) -> tuple[list[str], Tensor]:
        where = f"{field}: '{manifest}'"
        base = Path(root) if root else Path(manifest).resolve().parent
        paths = image_paths(part, path_key, base, where, allow_outside_root)
        check_images_exist(paths, manifest)
        labels = torch.tensor([class_of[r[label_key].strip()] for r in part], dtype=torch.long)
        return [str(p) for p in paths], labels

    train = files(parts["train"], train_csv)
    if "test" in parts:
        test = files(parts["test"], test_csv or train_csv)
        test_rows = parts["test"]
    else:
        mask = holdout(train[1], test_size, 0 if seed is None or seed < 0 else seed).tolist()
        keep = [i for i, m in enumerate(mask) if not m]
        held = [i for i, m in enumerate(mask) if m]
        test = ([train[0][i] for i in held], train[1][held])
        test_rows = [parts["train"][i] for i in held]
        parts["train"] = [parts["train"][i] for i in keep]
        train = ([train[0][i] for i in keep], train[1][keep])
    if not train[0] or not test[0]:
        raise ConfigError(f"{field}: '{train_csv}' has no training or no test rows")
    if experience_key is None:
        scenario, _ = class_incremental(
            train, test, n_experiences, seed, fixed_class_order, codec, return_task_id
        )
    else:
        values = sorted({r[experience_key] for r in parts["train"]})
        if len(values) != n_experiences:
            raise ConfigError(
                f"{ARGS}.n_experiences: column '{experience_key}' has {len(values)} values "
                f"{values[:10]}, one per experience; set n_experiences: {len(values)}"
            )
        index = {v: k for k, v in enumerate(values)}

        def group(part: list[Any]) -> Tensor:
            return torch.tensor([index.get(r[experience_key], -1) for r in part])

        scenario = split_experiences(
            train,
            test,
            [[v] for v in values],
            group(parts["train"]),
            group(test_rows),
            codec,
            return_task_id,
        )
    return DeclaredStream(
        scenario, fields=FIELDS, class_names=names, input_normalization=codec.normalize
    )
