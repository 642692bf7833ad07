"""How a file stream's samples become experiences: the class order, the seeded per-class
test share, and the class-incremental split into :class:`FileExperience` pairs (shared by
:func:`~mneme.datamodules.streams.image_folder.ImageFolderStream` and
:func:`~mneme.datamodules.streams.csv_images.CSVImageStream`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.file_experiences import (
    ARGS,
    FileExperience,
    FileImages,
    FileScenario,
    ImageCodec,
)
from torch import Tensor


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
