"""``ImageFolderStream``: a class-incremental stream of an ImageFolder tree
(``root/<class>/<image>``, classes the sorted folder names, as torchvision's ``ImageFolder``);
test images from ``test_root`` (same layout) or a seeded, per-class ``test_size`` share of
``root``. How file streams load and seed their images: :mod:`mneme.datamodules.streams.files`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.file_experiences import ARGS, FIELDS, make_codec
from mneme.datamodules.data.image_policy import OPT_OUT, inside_root
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.file_splits import class_incremental, holdout
from mneme.datamodules.streams.registry import stream
from torch import Tensor

EXTENSIONS = (".jpg", ".jpeg", ".png")


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
