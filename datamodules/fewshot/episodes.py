"""Few-shot episodes: N-way K-shot tasks with Q queries per class, drawn from any class-labelled
stream Mneme reads (Avalanche benchmarks, the built-in digit/MNIST/spoken-digit streams, CSV
manifests), for any modality.

No Lightning here; :class:`mneme.datamodules.fewshot.datamodule.EpisodicDataModule` serves these as
meta-batches.

- :class:`EpisodeSampler` precomputes each class's sample indices once (one sort of the
  labels); :meth:`EpisodeSampler.sample` then draws an episode from a generator in a few
  ``randperm`` calls. :func:`sample_episode` is the one-call form.
- An episode is ``(support_index (N*K,), query_index (N*Q,), classes (N,))``: indices into
  the labels, support and query disjoint, both class-major (block ``i`` holds class
  ``classes[i]``, whose episode-local label is ``i``). The ``N`` classes are drawn in random
  order, so a class's local label changes from episode to episode.
- Each episode has its own generator, seeded by :func:`episode_seed` from ``(seed, split,
  setting or epoch, episode index)``: an episode is the same whichever rank draws it, and in
  whatever order; :func:`rank_episodes` shards episode ``i`` to rank ``i % world_size``.
- :func:`check_class_splits` and :func:`check_episode_counts` refuse bad splits and settings
  with one-line :class:`~mneme.app.core.errors.ConfigError`\\ s.
- :class:`SamplePool` reads samples through the experiences API
  (:mod:`mneme.datamodules.data.experiences`): labels without reading a sample, then only the
  samples an episode uses (``read``), so a stream of files is read lazily.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.experiences import ExperienceData
from mneme.datamodules.data.tensor_batches import Batch
from torch import Tensor

# Ten classes (sklearn digits, MNIST, spoken digits): the default class split. Meta-train on
# 0-4 and meta-test on 5-9 allows 5-way evaluation; a validation split takes classes from one
# of them (e.g. meta_train 0-3, meta_val 4, ... leaves 4-way training).
DIGITS_META_TRAIN = (0, 1, 2, 3, 4)
DIGITS_META_TEST = (5, 6, 7, 8, 9)

# Fields of a sample that are not served in support/query (the label becomes local labels).
NOT_SERVED = ("label", "task")

_SPLIT_TAGS = {"train": 1, "val": 2, "test": 3}


class EpisodeSampler:
    """Draws N-way K-shot episodes from ``classes`` of a labelled pool.

    Args:
        labels: every sample's class label (``(num_samples,)``, integer).
        classes: the classes episodes draw from (a meta-train/val/test split).

    Each class's sample indices (ascending) are computed once here; drawing an episode reads
    no label again.

    Example::

        sampler = EpisodeSampler(pool.labels, [5, 6, 7, 8, 9])
        support, query, classes = sampler.sample(5, 1, 15, torch.Generator().manual_seed(0))
    """

    def __init__(self, labels: Tensor, classes: Sequence[int]) -> None:
        labels = torch.as_tensor(labels).long().flatten().cpu()
        # sorted: a split's episodes do not depend on the order a config lists its classes
        self.classes = torch.tensor(sorted(int(c) for c in classes), dtype=torch.long)
        order = torch.argsort(labels, stable=True)
        present, counts = torch.unique_consecutive(labels[order], return_counts=True)
        members = dict(zip(present.tolist(), order.split(counts.tolist()), strict=True))
        empty = torch.empty(0, dtype=torch.long)
        self.members = [members.get(int(c), empty) for c in self.classes.tolist()]

    def counts(self) -> dict[int, int]:
        """Samples per class of the split."""
        return {int(c): len(m) for c, m in zip(self.classes.tolist(), self.members, strict=True)}

    def sample(
        self, n_way: int, k_shot: int, q_queries: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One episode: ``(support_index (N*K,), query_index (N*Q,), classes (N,))``,
        class-major, support and query disjoint (drawn without replacement per class)."""
        if n_way > len(self.classes):
            raise ConfigError(
                f"data.n_way: {n_way}-way episodes need {n_way} classes, the split has "
                f"{len(self.classes)}; lower n_way or list more classes"
            )
        shots = k_shot + q_queries
        chosen = torch.randperm(len(self.classes), generator=generator)[:n_way]
        support, query = [], []
        for c in chosen.tolist():
            members = self.members[c]
            if len(members) < shots:
                raise ConfigError(
                    f"data.k_shot: class {int(self.classes[c])} has {len(members)} samples, "
                    f"fewer than k_shot + q_queries = {shots}; lower k_shot/q_queries or "
                    "drop the class"
                )
            picked = members[torch.randperm(len(members), generator=generator)[:shots]]
            support.append(picked[:k_shot])
            query.append(picked[k_shot:])
        return torch.cat(support), torch.cat(query), self.classes[chosen]


def sample_episode(
    labels: Tensor,
    classes: Sequence[int],
    n_way: int,
    k_shot: int,
    q_queries: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """One N-way K-shot episode with Q queries per class from the samples of ``classes``:
    ``(support_index (N*K,), query_index (N*Q,), episode_classes (N,))``, indices into
    ``labels``, support and query disjoint, class-major (local label ``i`` is
    ``episode_classes[i]``). Drawing many episodes: build an :class:`EpisodeSampler` once."""
    return EpisodeSampler(labels, classes).sample(n_way, k_shot, q_queries, generator)


def local_labels(n_way: int, per_class: int) -> Tensor:
    """Episode-local labels of a class-major block: ``[0]*per_class + ... + [N-1]*per_class``."""
    return torch.arange(n_way).repeat_interleave(per_class)


def episode_seed(seed: int, split: str, key: Sequence[int], index: int) -> int:
    """The seed of one episode's generator, from the run's (or evaluation's) ``seed``, the
    ``split`` (train/val/test), ``key`` (the epoch for training, the setting ``(n_way,
    k_shot, q_queries)`` for evaluation) and the episode's ``index``: independent of ranks,
    of loader order and of other settings (reordering ``eval_settings`` changes nothing)."""
    words = [int(seed) & (2**64 - 1), _SPLIT_TAGS[split], *(int(k) for k in key), int(index)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


def rank_episodes(
    num_episodes: int, rank: int = 0, world_size: int = 1, pad: str = "fresh"
) -> tuple[list[int], list[bool]]:
    """The episode indices rank ``rank`` serves, and which of them are padding.

    Episode ``i`` goes to rank ``i % world_size``; every rank serves
    ``ceil(num_episodes / world_size)`` episodes (the same number of batches, as DDP needs).
    The missing ones are ``pad``: ``"fresh"`` draws new episodes (indices from
    ``num_episodes`` on; training: nothing repeats), ``"repeat"`` repeats episodes from 0
    (evaluation: the episode set stays ``0..num_episodes-1``, the repeats are flagged so a
    metric can leave them out).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    total = math.ceil(num_episodes / world_size) * world_size
    indices = list(range(rank, total, world_size))
    padded = [i >= num_episodes for i in indices]
    if pad == "repeat":
        indices = [i % max(num_episodes, 1) for i in indices]
    elif pad != "fresh":
        raise ValueError(f"pad is 'fresh' or 'repeat', got {pad!r}")
    return indices, padded


def check_class_splits(
    splits: Mapping[str, Sequence[int] | None],
    stream_classes: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Refuse class splits that cannot separate meta-train from meta-test: a split listing a
    class twice, two splits sharing a class, or a class the stream lacks.

    Args:
        splits: ``{config field: classes}`` (``None``: the split is not used), e.g.
            ``{"data.meta_train_classes": [0, 1, 2], "data.meta_test_classes": [3, 4]}``.
        stream_classes: the classes the stream has (skip that check with ``None``).
        class_names: the stream's class names, shown beside the ids in errors.
    """
    used = {field: list(c) for field, c in splits.items() if c is not None}
    for field, classes in used.items():
        if not all(isinstance(c, int | np.integer) and not isinstance(c, bool) for c in classes):
            raise ConfigError(f"{field}: class ids are integers, got {classes}")
        twice = sorted({c for c in classes if classes.count(c) > 1})
        if twice:
            raise ConfigError(f"{field}: lists classes {twice} more than once; list each once")
    fields = list(used)
    for i, first in enumerate(fields):
        for second in fields[i + 1 :]:
            shared = sorted(set(used[first]) & set(used[second]))
            if shared:
                raise ConfigError(
                    f"{first} and {second} share classes {_named(shared, class_names)}; a "
                    "class belongs to one split: remove them from one of the two"
                )
    if stream_classes is not None:
        known = set(int(c) for c in stream_classes)
        for field, classes in used.items():
            unknown = sorted(set(classes) - known)
            if unknown:
                raise ConfigError(
                    f"{field}: classes {unknown} are not in the stream (its classes: "
                    f"{_span(sorted(known))}); list classes the stream has"
                )


def check_episode_counts(
    field: str,
    classes: Sequence[int],
    counts: Mapping[int, int],
    n_way: int,
    k_shot: int,
    q_queries: int,
    way_field: str = "data.n_way",
    shot_field: str = "data.k_shot",
    class_names: Sequence[str] | None = None,
) -> None:
    """Refuse episodes the split ``field`` cannot fill: ``n_way`` above its number of
    classes, or a class with fewer than ``k_shot + q_queries`` samples.

    Args:
        field: the split's config field (``data.meta_test_classes``).
        counts: samples per class (:meth:`EpisodeSampler.counts`).
        way_field, shot_field: the config fields that set ``n_way`` and ``k_shot`` (for an
            evaluation setting, ``data.eval_settings[1]``), named first in the error.
    """
    if n_way > len(classes):
        raise ConfigError(
            f"{way_field}: {n_way}-way episodes need {n_way} classes, but {field} has "
            f"{len(classes)}; lower n_way to at most {len(classes)} or list more classes there"
        )
    shots = k_shot + q_queries
    short = [c for c in classes if counts.get(int(c), 0) < shots]
    if short:
        c = short[0]
        more = f" (and {len(short) - 1} more classes too few)" if len(short) > 1 else ""
        raise ConfigError(
            f"{shot_field}: class {_named([c], class_names)[0]} of {field} has "
            f"{counts.get(int(c), 0)} samples{more}, fewer than k_shot + q_queries = {k_shot} "
            f"+ {q_queries}; lower k_shot or data.q_queries, or drop class {c} from {field}"
        )


def _named(classes: Sequence[int], names: Sequence[str] | None) -> list:
    if names is None:
        return list(classes)
    return [f"{c} ({names[c]!r})" if 0 <= c < len(names) else c for c in classes]


def _span(classes: list[int]) -> str:
    if classes and classes == list(range(classes[0], classes[-1] + 1)) and len(classes) > 3:
        return f"{classes[0]}..{classes[-1]}"
    return str(classes)


class SamplePool:
    """The samples of several experiences as one indexable pool.

    ``labels`` is known without reading a sample (``ExperienceData.labels()``); ``read``
    reads only the samples asked for, through each experience's ``read`` (an index slice of
    tensors when materialized, the dataset's samples otherwise). Index ``i`` is sample
    ``i - offset[e]`` of experience ``e``, experiences in the order given.
    """

    def __init__(self, experiences: Sequence[ExperienceData]) -> None:
        self.experiences = list(experiences)
        sizes = [len(e) for e in self.experiences]
        self.offsets = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.long)
        self.labels = torch.cat([e.labels().long().cpu() for e in self.experiences])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, index: Tensor) -> Batch:
        """The samples at ``index`` (any order, repeats allowed) as one dict batch."""
        index = torch.as_tensor(index, dtype=torch.long)
        owner = torch.searchsorted(self.offsets, index, right=True) - 1
        out: Batch = {}
        for e in owner.unique().tolist():
            rows = (owner == e).nonzero().squeeze(1)
            part = self.experiences[e].read(index[rows] - self.offsets[e])
            for key, value in part.items():
                if key not in out:
                    out[key] = value.new_empty((len(index), *value.shape[1:]))
                out[key][rows.to(value.device)] = value
        return out

    def field_shape(self, key: str) -> tuple[int, ...] | None:
        return self.experiences[0].field_shape(key)


def episode_batch(
    pool: SamplePool,
    episodes: Sequence[tuple[Tensor, Tensor, Tensor]],
    fields: Sequence[str],
) -> dict:
    """Stack ``episodes`` (from one setting) into a meta-batch, reading their samples at once:
    ``support``/``query`` ``{field: (T, N*K or N*Q, ...)}``, ``support_label``/
    ``query_label`` ``(T, N*K)``/``(T, N*Q)`` local labels, ``classes`` ``(T, N)``."""
    support = torch.stack([s for s, _, _ in episodes])
    query = torch.stack([q for _, q, _ in episodes])
    classes = torch.stack([c for _, _, c in episodes])
    t, nk = support.shape
    nq = query.shape[1]
    n_way = classes.shape[1]
    samples = pool.read(torch.cat([support, query], 1).flatten())
    batch: dict = {"support": {}, "query": {}}
    for key in fields:
        value = samples[key].view(t, nk + nq, *samples[key].shape[1:])
        batch["support"][key] = value[:, :nk].contiguous()
        batch["query"][key] = value[:, nk:].contiguous()
    batch["support_label"] = local_labels(n_way, nk // n_way).expand(t, nk).clone()
    batch["query_label"] = local_labels(n_way, nq // n_way).expand(t, nq).clone()
    batch["classes"] = classes
    return batch
