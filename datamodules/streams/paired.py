"""Spoken digits paired with MNIST images of the same digit: a two-modality stream for
joint (fusion) classifiers.

Each clip of ``spoken_digits.npz`` (int16 PCM at 8 kHz) is paired with a real 28x28 MNIST
digit of its class from ``mnist10k.npz``, drawn at random (seeded): training clips with
images of the MNIST training rows, test clips with images of the test rows, so no image is
seen in both. The clips are split as :func:`mneme.datamodules.SpokenDigits` splits them
(stratified by accent and digit) and the images are read and standardized as
:func:`mneme.datamodules.SplitMNISTFile` reads them. Samples are ``(audio, label, image)``:
``fields: [audio, label, image, task]``; the stream is class-incremental by digit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.streams.captions import PairedTensors
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.digits import MNIST_MEAN, MNIST_STD, load_mnist_npz, split_benchmark
from mneme.datamodules.streams.registry import stream
from mneme.datamodules.streams.spoken_digits import load_spoken_digits, paired_images

SAMPLE_KEYS = ("audio", "label", "image", "task")
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@stream
def SpokenMNIST(  # noqa: N802 - named like Avalanche's benchmark factories
    audio_path: str,
    image_path: str,
    n_experiences: int = 5,
    *,
    seed: int | None = 0,
    fixed_class_order: Sequence[int] | None = None,
    test_size: float = 0.25,
    images_per_clip: int = 1,
):
    """Class-incremental pairs of a spoken digit and an MNIST image of the same digit.

    Args:
        audio_path: ``spoken_digits.npz`` (e.g. ``../shared/data/spoken_digits.npz``).
        image_path: an MNIST ``.npz`` (``images``, ``labels``; the first 8,000 rows train).
        n_experiences: experiences of the class-incremental split (a divisor of 10).
        seed: class order and train/test split of the clips.
        fixed_class_order: the class order, instead of the seeded one.
        test_size: fraction of the clips held out for testing.
        images_per_clip: training pairs per clip, each with another image (test: one).

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.SpokenMNIST
          benchmark_args:
            audio_path: ../shared/data/spoken_digits.npz
            image_path: ../shared/data/mnist10k.npz
            n_experiences: 5
    """
    from sklearn.model_selection import train_test_split

    if not isinstance(images_per_clip, int) or images_per_clip < 1:
        raise ConfigError(
            f"data.benchmark_args.images_per_clip: an integer >= 1, got {images_per_clip!r}"
        )
    clips = load_spoken_digits(audio_path)
    labels, accent = clips["labels"], clips["accent"]
    mnist_train, mnist_test = load_mnist_npz(image_path)
    for name, images in (("training", mnist_train), ("test", mnist_test)):
        missing = sorted(set(labels.tolist()) - set(images.targets))
        if missing:
            raise ConfigError(
                f"data.benchmark_args.image_path: its {name} rows have no image of digits "
                f"{missing}, which the clips of audio_path say; use a file with every digit"
            )
    strata = np.array([f"{a}/{y}" for a, y in zip(accent, labels, strict=True)])
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed or 0, stratify=strata
    )
    audio = torch.from_numpy(clips["audio"])

    def paired(index: np.ndarray, images, pairing_seed: int, repeats: int) -> PairedTensors:
        index = np.tile(index, repeats)  # each clip ``repeats`` times, a new image each time
        y = torch.from_numpy(labels[index])
        image = paired_images(labels[index], images.inputs, images.targets, pairing_seed)
        return PairedTensors([audio[torch.from_numpy(index)], image], y)

    scenario = split_benchmark(
        paired(train_idx, mnist_train, 0, images_per_clip),
        paired(test_idx, mnist_test, 1, 1),
        n_experiences,
        False,
        seed,
        fixed_class_order,
        False,
    )
    return DeclaredStream(
        scenario,
        fields=SAMPLE_KEYS,
        class_names=list(CLASS_NAMES),
        input_normalization=(MNIST_MEAN, MNIST_STD),
    )
