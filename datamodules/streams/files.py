"""Streams of image files that need not fit in memory: an ImageFolder tree or a CSV manifest.

Nothing but paths and labels is held: each image is decoded (``torchvision.io`` or PIL) and
augmented (torchvision v2 transforms or ``timm.data.create_transform``, named in YAML) when
a batch asks for it, in the DataLoader's workers. The datamodule serves the experiences as
it serves any other stream (``train_dataloader`` the current one, one eval loader per test
experience, dict batches ``{image, label, task}``); a file stream's experiences build their
own loaders (:meth:`FileExperience.loader`), with workers (``data.num_workers``), pinned
memory on CUDA, ``data.prefetch_factor``, and workers that persist through each training
experience's epochs. A file stream is never materialized (``data.materialize`` does not
apply; ``data.data_on_device`` is refused). Strategies read through the experience
(Replay's buffer holds the decoded, un-augmented tensors of the samples it keeps; see
:mod:`mneme.datamodules.data.experiences`).

Randomness: the training order is the datamodule's (seeded by ``(run seed, epoch)``), and a
sample's augmentation is seeded by ``(run seed, epoch, index)`` wherever it is decoded, so a
run draws the same augmented batches with 0 or N workers, persistent or not, and resumed.

Layouts:

- ``ImageFolderStream``: ``root/<class>/<image>`` as torchvision's ``ImageFolder`` (classes
  are the sorted folder names); test images from ``test_root`` (same layout) or a seeded,
  per-class ``test_size`` share of ``root``.
- ``CSVImageStream``: rows ``path,label[,split]`` (paths relative to ``root``, default the
  CSV's folder, kept inside it); ``split`` says ``train``/``test``; integer labels are class
  indices, other labels are class names (sorted). ``experience_key`` splits experiences by
  a column's values (domain-incremental) instead of by class.

Make an ImageFolder tree of real MNIST digits (used by ``configs/file_stream.yaml``)::

    python -m mneme.datamodules.streams.files ../shared/data/mnist10k.npz /tmp/mnist_folder
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.file_experiences import (
    ARGS,
    FIELDS,
    FileExperience,
    FileImages,
    FileScenario,
    ImageCodec,
    make_codec,
)
from mneme.datamodules.data.image_policy import OPT_OUT, inside_root
from mneme.datamodules.data.labels import check_labels
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.registry import stream
from torch import Tensor

EXTENSIONS = (".jpg", ".jpeg", ".png")


def class_order(classes: Sequence[int], seed: int | None) -> list[int]:
    """The classes in the stream's order: a permutation seeded by ``seed`` (the run's seed
    when ``None``), or sorted with ``seed: -1`` (hand-written: a few lines)."""
    from mneme.app.core.seeding import run_seed

    classes = sorted(classes)
    if seed == -1:
        return classes
    generator = torch.Generator().manual_seed(run_seed(seed))
    return [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]


def split_experiences(
    train: tuple[list[str], Tensor],
    test: tuple[list[str], Tensor],
    groups: list[list[int]],
    train_group: Tensor,
    test_group: Tensor,
    codec: ImageCodec,
    return_task_id: bool,
) -> FileScenario:
    """One train and one test :class:`FileExperience` per group (sample indices of group
    ``k`` are those whose ``*_group`` is ``k``)."""
    pool: dict = {}
    streams: list[list[FileExperience]] = [[], []]
    for (paths, labels), group, out in (
        (train, train_group, streams[0]),
        (test, test_group, streams[1]),
    ):
        for k in range(len(groups)):
            rows = (group == k).nonzero().flatten()
            if len(rows) == 0:
                which = "training" if out is streams[0] else "test"
                raise ConfigError(
                    f"{ARGS}.n_experiences: experience {k} (classes {groups[k]}) has no "
                    f"{which} images; add images or use fewer experiences"
                )
            task = k if return_task_id else 0
            images = FileImages([paths[i] for i in rows.tolist()], labels[rows], task, codec)
            out.append(FileExperience(images, pool))
    return FileScenario(*streams)


def class_incremental(
    train: tuple[list[str], Tensor],
    test: tuple[list[str], Tensor],
    n_experiences: int,
    seed: int | None,
    fixed_class_order: Sequence[int] | None,
    codec: ImageCodec,
    return_task_id: bool,
) -> tuple[FileScenario, list[int]]:
    """Experiences of ``C / n_experiences`` classes each, in :func:`class_order`."""
    classes = sorted(set(train[1].tolist()))
    missing = sorted(set(classes) - set(test[1].tolist()))
    if missing:
        raise ConfigError(
            f"{ARGS}: classes {missing} have training images but no test images; a "
            "class-incremental split needs both for every class"
        )
    if fixed_class_order is not None:
        order = [int(c) for c in fixed_class_order]
        if sorted(order) != classes:
            raise ConfigError(
                f"{ARGS}.fixed_class_order: {order} must list each class {classes} once"
            )
    else:
        order = class_order(classes, seed)
    if n_experiences < 1 or len(order) % n_experiences:
        raise ConfigError(
            f"{ARGS}.n_experiences: {len(order)} classes do not split into {n_experiences} "
            "equal experiences; pick a divisor of the class count"
        )
    size = len(order) // n_experiences
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    group_of = torch.full((max(order) + 1,), -1, dtype=torch.long)
    for k, group in enumerate(groups):
        group_of[group] = k
    scenario = split_experiences(
        train, test, groups, group_of[train[1]], group_of[test[1]], codec, return_task_id
    )
    return scenario, order


def holdout(labels: Tensor, test_size: float, seed: int) -> Tensor:
    """A mask of the test share: ``test_size`` of each class (at least one), seeded."""
    if not 0.0 < test_size < 1.0:
        raise ConfigError(f"{ARGS}.test_size: a fraction in (0, 1), got {test_size}")
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        mask[rows[: max(1, round(test_size * len(rows)))]] = True
    return mask


def check_linked_folders(root: Path, field: str, allow_outside_root: bool) -> None:
    """Refuse, before torchvision walks the tree (it follows every symlinked folder), a
    symlinked folder that leads out of ``root`` (unless ``allow_outside_root``) or to one of
    its own ancestors (a loop: two of them make the walk exponential)."""
    inside = root.resolve()
    for folder, subfolders, _ in os.walk(root):  # not following links
        for name in subfolders:
            link = Path(folder, name)
            if not link.is_symlink():
                continue
            target = link.resolve()
            if Path(folder).resolve().is_relative_to(target):
                raise ConfigError(
                    f"{field}: '{link}' links to its own ancestor '{target}' (a loop); "
                    "remove the link"
                )
            if not allow_outside_root and not target.is_relative_to(inside):
                raise ConfigError(
                    f"{field}: '{link}' is outside root '{inside}' (a symlink leads out, to "
                    f"'{target}'); keep images under the root, or set {OPT_OUT}"
                )


def read_folder(
    root: str | Path, extensions: Sequence[str], field: str, allow_outside_root: bool = False
) -> tuple[list[str], list[str], Tensor]:
    """``(class names, paths, labels)`` of an ImageFolder tree, by torchvision's own
    ``find_classes``/``make_dataset`` (sorted class folders, files by extension). Each file
    is kept as its resolved path, which must stay inside ``root`` (torchvision follows
    symlinks, to files and folders alike) unless ``allow_outside_root``, and be reached
    once (a folder linked to its own ancestor would repeat its images)."""
    from torchvision.datasets.folder import find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"{field}: no folder at '{root}'; point it at root/<class>/<image> (make one with "
            "python -m mneme.datamodules.streams.files NPZ FOLDER)"
        )
    check_linked_folders(root, field, allow_outside_root)
    try:
        names, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=tuple(extensions))
    except FileNotFoundError as err:  # no class folder, or a class with no image file
        raise ConfigError(
            f"{field}: '{root}': {' '.join(str(err).split())}; every class folder needs images"
        ) from None
    paths, seen = [], {}
    for path, _ in samples:
        where = f"{field}: '{root}'"
        resolved = inside_root(Path(path).relative_to(root), root, where, allow_outside_root)
        if resolved in seen:
            raise ConfigError(
                f"{where}: '{resolved}' is reached both as '{seen[resolved]}' and as "
                f"'{path}' (a symlinked folder or file); keep one copy per image"
            )
        seen[resolved] = path
        paths.append(str(resolved))
    return names, paths, torch.tensor([c for _, c in samples], dtype=torch.long)


@stream
def ImageFolderStream(  # noqa: N802 - named like Avalanche's benchmark factories
    root: str,
    n_experiences: int = 5,
    *,
    test_root: str | None = None,
    test_size: float = 0.2,
    seed: int | None = 0,
    fixed_class_order: Sequence[int] | None = None,
    return_task_id: bool = False,
    image_size: int = 32,
    channels: int = 3,
    decoder: str = "torchvision",
    train_transform: Any = None,
    eval_transform: Any = None,
    extensions: Sequence[str] = EXTENSIONS,
    normalize: Sequence[float] | None = None,
    allow_outside_root: bool = False,
):
    """Class-incremental stream of an ImageFolder tree (``root/<class>/<image>``).

    ``seed``: the class order (and the held-out split); ``None``: the run's seed; ``-1``:
    sorted. ``train_transform``/``eval_transform``: a list of torchvision v2 transforms
    ``[{name: RandomCrop, size: 32, padding: 4}, ...]`` or ``{timm: {create_transform
    arguments}}``; images are resized to ``image_size`` and scaled to ``[0, 1]`` after,
    then standardized by ``normalize: [mean, std]`` if given (declared to the model, as
    the MNIST streams declare theirs; a pretrained backbone undoes it). A symlink in the
    tree may not lead out of ``root`` (``test_root``) unless ``allow_outside_root``.

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.ImageFolderStream
          benchmark_args:
            root: /tmp/mnist_folder/train
            test_root: /tmp/mnist_folder/test
            n_experiences: 5
            channels: 1
            train_transform: [{name: RandomAffine, degrees: 10, translate: [0.1, 0.1]}]
          materialize: false
          num_workers: 2
    """
    codec = make_codec(
        image_size, channels, decoder, train_transform, eval_transform, f"{ARGS}.root", normalize
    )
    names, paths, labels = read_folder(root, extensions, f"{ARGS}.root", allow_outside_root)
    if test_root is not None:
        test_names, test_paths, test_labels = read_folder(
            test_root, extensions, f"{ARGS}.test_root", allow_outside_root
        )
        if test_names != names:
            raise ConfigError(
                f"{ARGS}.test_root: its classes {test_names} differ from root's {names}; "
                "both need the same class folders"
            )
    else:
        mask = holdout(labels, test_size, 0 if seed is None or seed < 0 else seed)
        test_paths = [p for p, m in zip(paths, mask.tolist(), strict=True) if m]
        paths = [p for p, m in zip(paths, mask.tolist(), strict=True) if not m]
        labels, test_labels = labels[~mask], labels[mask]
    scenario, _ = class_incremental(
        (paths, labels),
        (test_paths, test_labels),
        n_experiences,
        seed,
        fixed_class_order,
        codec,
        return_task_id,
    )
    return DeclaredStream(
        scenario, fields=FIELDS, class_names=names, input_normalization=codec.normalize
    )


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


def write_image_folder(
    npz: str | Path, out: str | Path, copies: int = 1, size: int = 32, quality: int = 90
) -> int:
    """Write the digits of an ``.npz`` (``images`` (N, H, W) uint8, ``labels``; e.g.
    ``../shared/data/mnist10k.npz``) as JPEG files ``out/{train,test}/<label>/<i>.jpg``
    (first 80% train), padded to ``size``; ``copies > 1`` adds copies shifted by one pixel
    per copy (more files, not more digits). Returns the number of files."""
    from mneme.datamodules.streams.digits import read_npz
    from PIL import Image

    arrays = read_npz(npz, ("images", "labels"), "an .npz with 'images' and 'labels'")
    images, labels = np.asarray(arrays["images"]), np.asarray(arrays["labels"])
    n_train = int(0.8 * len(images))
    written = 0
    for copy in range(copies):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            canvas = np.zeros((size, size), dtype=np.uint8)
            h, w = min(image.shape[0], size), min(image.shape[1], size)
            top, left = (size - h) // 2, (size - w) // 2
            canvas[top : top + h, left : left + w] = image[:h, :w]
            canvas = np.roll(canvas, copy, axis=1)
            folder = Path(out) / ("train" if i < n_train else "test") / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas, "L").save(folder / f"{copy}_{i}.jpg", quality=quality)
            written += 1
    return written


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=write_image_folder.__doc__)
    parser.add_argument("npz")
    parser.add_argument("out")
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    print(write_image_folder(args.npz, args.out, args.copies, args.size), "files in", args.out)
